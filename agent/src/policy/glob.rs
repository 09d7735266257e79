//! Shell-style globs for exe paths, cgroups, names and secret patterns.

/// A glob that behaves like a shell's: `*` matches any run of characters but `/`, `?` any
/// one character but `/`, and `**` any run including `/` (`**/` also matches no directory
/// at all, so `/opt/**/python3` fits `/opt/python3`). Hand-written rather than taken from a
/// crate: it is twenty lines, allocation-free on the hot path, and its exact semantics are
/// part of the policy contract (docs/config.md), which a dependency could change under us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Glob(pub(super) String);

impl Glob {
    pub(crate) fn new(pattern: &str) -> Self {
        Self(pattern.to_owned())
    }

    pub(crate) fn matches(&self, text: &str) -> bool {
        glob_match(self.0.as_bytes(), text.as_bytes())
    }
}

/// Backtracking over the last `*` and the last `**` only: linear for patterns without `**`,
/// and at most (text length)² steps with it — patterns and paths are short.
fn glob_match(p: &[u8], t: &[u8]) -> bool {
    let (mut pi, mut ti) = (0, 0);
    // The last single `*`: (pattern index after it, text index it stands up to).
    let mut star: Option<(usize, usize)> = None;
    // The last `**`: (pattern index after it, text index it stands up to, whether it was
    // `**/` and so must stand for whole directories: a run that ends with `/`).
    let mut globstar: Option<(usize, usize, bool)> = None;
    loop {
        if pi < p.len() && p[pi] == b'*' {
            if p.get(pi + 1) == Some(&b'*') {
                let mut after = pi + 2;
                // `**/` may stand for no directory at all: try that first.
                let dirs = p.get(after) == Some(&b'/') && (pi == 0 || p[pi - 1] == b'/');
                if dirs {
                    after += 1;
                }
                globstar = Some((after, ti, dirs));
                star = None;
                pi = after;
            } else {
                star = Some((pi + 1, ti));
                pi += 1;
            }
            continue;
        }
        if ti == t.len() {
            if pi == p.len() {
                return true;
            }
        } else if pi < p.len() && (p[pi] == t[ti] || (p[pi] == b'?' && t[ti] != b'/')) {
            pi += 1;
            ti += 1;
            continue;
        }
        // Mismatch: let the last `*` take one more character (never a `/`), else the last
        // `**` (any character), else fail.
        if let Some((sp, st)) = star
            && st < t.len()
            && t[st] != b'/'
        {
            star = Some((sp, st + 1));
            pi = sp;
            ti = st + 1;
            continue;
        }
        if let Some((gp, gt, dirs)) = globstar {
            // `**/` resumes only just after a `/`; plain `**` after any character.
            let next =
                if dirs { t[gt..].iter().position(|&c| c == b'/').map(|i| gt + i + 1) } else { Some(gt + 1) };
            if let Some(next) = next.filter(|&n| n <= t.len()) {
                globstar = Some((gp, next, dirs));
                star = None;
                pi = gp;
                ti = next;
                continue;
            }
        }
        return false;
    }
}
