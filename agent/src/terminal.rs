//! Printing to a terminal what others wrote: audit records, process names, cached
//! secrets' names and errors. Everything a caller, a file or Key Vault supplied passes
//! through [`escape`] first; [`table`] lines columns up however long a cell is.

use std::fmt::Write;

/// Makes an untrusted string safe for a terminal: every `char::is_control` character (ESC,
/// CR, BEL, DEL, C1 controls) and every bidirectional override or isolate (which can make
/// text read in another order) becomes `\u{…}`, and a backslash becomes `\\`, so an
/// escape sequence already in the text cannot pass for one of ours.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else if c == '\\' {
            out.push_str("\\\\");
        } else {
            out.push(c);
        }
    }
    out
}

/// An aligned, borderless table: columns as wide as their widest cell, two spaces apart.
pub(crate) fn table<const N: usize>(
    header: [&str; N],
    right: [bool; N],
    rows: impl IntoIterator<Item = [String; N]>,
) -> String {
    use comfy_table::{CellAlignment, Table, presets};
    let mut t = Table::new();
    t.load_preset(presets::NOTHING);
    t.set_header(header);
    t.add_rows(rows);
    for (i, col) in t.column_iter_mut().enumerate() {
        col.set_padding((0, 2));
        if right[i] {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
    let mut out = String::new();
    for line in t.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_controls_bidi_and_backslash() {
        assert_eq!(escape("a\x1b[31mb\u{202e}c\\"), "a\\u{1b}[31mb\\u{202e}c\\\\");
    }

    #[test]
    fn columns_line_up_with_a_long_cell() {
        let long = "/opt/a/very/long/path/to/some/python3.11".to_owned();
        let t =
            table(["EXE", "N"], [false, true], [[long.clone(), "1".into()], ["/bin/sh".into(), "22".into()]]);
        let lines: Vec<&str> = t.lines().collect();
        // Right-aligned numbers end in one column, past the longest path.
        assert!(lines.iter().all(|l| l.len() == long.len() + 2 + 2), "{t}");
        assert!(lines[2].starts_with("/bin/sh "), "{t}");
    }
}
