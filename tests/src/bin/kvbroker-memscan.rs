//! `kvbroker-memscan PID` with needles on standard input, one per line: counts how many
//! times each needle appears anywhere in the process's readable memory (as root, through
//! /proc/PID/maps and /proc/PID/mem). Prints `{"NEEDLE-INDEX": COUNT, …}` as JSON, by index,
//! so the output never repeats a needle.

use std::fs::File;
use std::io::{BufRead, Read, Seek, SeekFrom};
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(pid) = std::env::args().nth(1).and_then(|p| p.parse::<u32>().ok()) else {
        eprintln!("usage: kvbroker-memscan PID < needles (one per line)");
        return ExitCode::from(2);
    };
    let needles: Vec<Vec<u8>> = std::io::stdin()
        .lock()
        .lines()
        .map_while(Result::ok)
        .filter(|l| !l.is_empty())
        .map(String::into_bytes)
        .collect();
    match scan(pid, &needles) {
        Ok(counts) => {
            let body: Vec<String> = counts.iter().enumerate().map(|(i, c)| format!("\"{i}\":{c}")).collect();
            println!("{{{}}}", body.join(","));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kvbroker-memscan: {e}");
            ExitCode::from(1)
        }
    }
}

fn scan(pid: u32, needles: &[Vec<u8>]) -> std::io::Result<Vec<usize>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut mem = File::open(format!("/proc/{pid}/mem"))?;
    let mut counts = vec![0; needles.len()];
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else { continue };
        let name = fields.nth(3).unwrap_or("");
        if !perms.starts_with('r') || name == "[vvar]" || name == "[vsyscall]" || name == "[vvar_vclock]" {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else { continue };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else { continue };
        let mut buf = vec![0u8; usize::try_from(end - start).unwrap_or(0)];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        for (i, n) in needles.iter().enumerate() {
            counts[i] += buf.windows(n.len()).filter(|w| *w == n.as_slice()).count();
        }
    }
    Ok(counts)
}
