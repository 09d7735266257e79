//! Job-output masking: replace every value a job was served, and the encodings it leaks in
//! (see [`forms`]), with `***` in a byte stream, before the stream reaches the job's log.
//!
//! Three types, no I/O (the pumps that read a child's pipes live in `kvb exec` and
//! `kvbroker launch`; this crate has no runtime):
//!
//! - [`MaskValues`]: what one job has been served so far, shared by every stream of the job
//!   and by whoever serves values (`learn` before the value is handed over, so no output can
//!   contain it before the masker knows it).
//! - [`MaskSet`]: one immutable snapshot of the patterns, compiled into an Aho-Corasick
//!   automaton.
//! - [`Masker`]: one output stream's state. It never emits a byte that could be the start of a
//!   pattern whose end has not arrived yet, so a value split across writes is still caught;
//!   every other byte is emitted at once, so a line that does not end in the first bytes of a
//!   value is never delayed. Matches may overlap (one value's end is another's start): they
//!   are merged and masked as one.
//!
//! The patterns are held in [`Zeroizing`] buffers. The automaton's tables (the trie's
//! transitions, and the literal prefilter's copies of the patterns) are `aho-corasick`'s own
//! allocations, which it does not wipe: see docs/security.md. Never logs or formats a value;
//! `Debug` shows only counts.

mod forms;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use aho_corasick::{AhoCorasick, MatchKind};
use zeroize::Zeroizing;

pub use forms::forms;

/// What a masked occurrence becomes.
pub const MASK: &[u8] = b"***";

/// Values shorter than this are not masked: masking every `1` or `abc` in a log would make it
/// unreadable, and a value that short is no secret anyway.
pub const MIN_VALUE_LEN: usize = 4;

/// The values one job has been served, as patterns, shared by every stream of the job.
pub struct MaskValues {
    set: RwLock<Arc<MaskSet>>,
    generation: AtomicU64,
}

impl Default for MaskValues {
    fn default() -> Self {
        Self::new()
    }
}

impl MaskValues {
    /// No values yet.
    pub fn new() -> Self {
        Self { set: RwLock::new(Arc::new(MaskSet::empty())), generation: AtomicU64::new(0) }
    }

    /// Starts masking `value` and its encodings. Cheap when it is already known; otherwise
    /// rebuilds the automaton (a few ms for hundreds of values). Returns whether anything new
    /// was added (values shorter than [`MIN_VALUE_LEN`] never are).
    pub fn learn(&self, value: &[u8]) -> bool {
        if value.len() < MIN_VALUE_LEN {
            return false;
        }
        let mut guard = self.set.write().unwrap_or_else(PoisonError::into_inner);
        let new: Vec<_> = forms(value).into_iter().filter(|f| !guard.contains(f)).collect();
        if new.is_empty() {
            return false;
        }
        let mut all: Vec<Zeroizing<Vec<u8>>> =
            guard.patterns.iter().map(|p| Zeroizing::new(p.to_vec())).collect();
        all.extend(new);
        *guard = Arc::new(MaskSet::build(all));
        self.generation.fetch_add(1, Ordering::Release);
        true
    }

    /// Bumped by every [`MaskValues::learn`] that added something.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The patterns in force now, with their generation.
    pub fn snapshot(&self) -> (u64, Arc<MaskSet>) {
        let guard = self.set.read().unwrap_or_else(PoisonError::into_inner);
        (self.generation(), Arc::clone(&guard))
    }
}

impl fmt::Debug for MaskValues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (generation, set) = self.snapshot();
        write!(f, "MaskValues(generation {generation}, {set:?})")
    }
}

/// A compiled, immutable set of patterns.
pub struct MaskSet {
    /// Sorted and deduplicated, for the prefix test of [`MaskSet::could_start`].
    patterns: Vec<Zeroizing<Vec<u8>>>,
    automaton: Option<AhoCorasick>,
    /// Whether some pattern starts with this byte: most positions fail here, cheaply.
    first: [bool; 256],
    /// Whether some pattern contains this byte: a tail holding any other byte (a newline,
    /// usually) cannot grow into a match, so nothing before it is held.
    used: [bool; 256],
    max_len: usize,
}

impl fmt::Debug for MaskSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MaskSet(<{} patterns, longest {} bytes>)", self.patterns.len(), self.max_len)
    }
}

impl MaskSet {
    fn empty() -> Self {
        Self { patterns: Vec::new(), automaton: None, first: [false; 256], used: [false; 256], max_len: 0 }
    }

    fn build(mut patterns: Vec<Zeroizing<Vec<u8>>>) -> Self {
        patterns.retain(|p| !p.is_empty());
        patterns.sort_unstable_by(|a, b| a.as_slice().cmp(b.as_slice()));
        patterns.dedup_by(|a, b| a.as_slice() == b.as_slice());
        let mut first = [false; 256];
        let mut used = [false; 256];
        for p in &patterns {
            first[usize::from(p[0])] = true;
            for &b in p.iter() {
                used[usize::from(b)] = true;
            }
        }
        let max_len = patterns.iter().map(|p| p.len()).max().unwrap_or(0);
        // Standard semantics: overlapping search reports every occurrence of every pattern,
        // so overlapping values are masked as their union. A build error (only for
        // automata past aho-corasick's size limits) falls back to masking nothing new
        // rather than panicking in a job's output path; with thousands of values it cannot
        // happen in practice.
        let automaton = if patterns.is_empty() {
            None
        } else {
            AhoCorasick::builder()
                .match_kind(MatchKind::Standard)
                .build(patterns.iter().map(|p| p.as_slice()))
                .ok()
        };
        Self { patterns, automaton, first, used, max_len }
    }

    /// How many patterns (every value times its encodings).
    pub fn len(&self) -> usize {
        self.patterns.len()
    }

    /// Whether there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The longest pattern, in bytes.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    fn contains(&self, p: &[u8]) -> bool {
        self.patterns.binary_search_by(|x| x.as_slice().cmp(p)).is_ok()
    }

    /// Whether `tail` is a proper prefix of some pattern: more bytes could complete a match.
    fn could_start(&self, tail: &[u8]) -> bool {
        let i = self.patterns.partition_point(|p| p.as_slice() < tail);
        // Sorted: the patterns starting with `tail` follow it directly (an equal one first).
        self.patterns[i..].iter().take(2).any(|p| p.len() > tail.len() && p.starts_with(tail))
    }

    /// Every match in `hay`, merged where they overlap, sorted by start: into `out`.
    fn matches(&self, hay: &[u8], out: &mut Vec<(usize, usize)>) {
        out.clear();
        let Some(ac) = &self.automaton else { return };
        for m in ac.find_overlapping_iter(hay) {
            out.push((m.start(), m.end()));
        }
        if out.is_empty() {
            return;
        }
        out.sort_unstable();
        let mut merged = 0;
        for i in 1..out.len() {
            let (s, e) = out[i];
            if s < out[merged].1 {
                out[merged].1 = out[merged].1.max(e);
            } else {
                merged += 1;
                out[merged] = (s, e);
            }
        }
        out.truncate(merged + 1);
    }
}

/// One output stream's masking state: feed it what the child wrote, write what it returns.
pub struct Masker {
    values: Arc<MaskValues>,
    generation: u64,
    set: Arc<MaskSet>,
    /// Bytes read but not yet emitted: at most the longest pattern, plus what one push added.
    pending: Zeroizing<Vec<u8>>,
    /// How many leading bytes of `pending` a `***` already emitted stands for (a match that
    /// ran past the emitted part, kept because another value may overlap its end).
    covered: usize,
    spans: Vec<(usize, usize)>,
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Masker(<{} bytes held>, {:?})", self.pending.len(), self.set)
    }
}

impl Masker {
    /// A stream masked with `values` (and whatever they learn later).
    pub fn new(values: Arc<MaskValues>) -> Self {
        let (generation, set) = values.snapshot();
        Self {
            values,
            generation,
            set,
            pending: Zeroizing::new(Vec::with_capacity(8192)),
            covered: 0,
            spans: Vec::new(),
        }
    }

    /// Masks `data` (the next bytes of the stream) and appends what may be emitted to `out`.
    /// Holds back only a tail that could be the start of a value.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if self.values.generation() != self.generation {
            (self.generation, self.set) = self.values.snapshot();
        }
        append_wiped(&mut self.pending, data);
        self.emit(out, false);
    }

    /// The stream ended: emits everything held, masked.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.values.generation() != self.generation {
            (self.generation, self.set) = self.values.snapshot();
        }
        self.emit(out, true);
    }

    /// How many bytes are held back waiting for more.
    pub fn held(&self) -> usize {
        self.pending.len() - self.covered.min(self.pending.len())
    }

    fn emit(&mut self, out: &mut Vec<u8>, eof: bool) {
        let p = &self.pending[..];
        let mut spans = std::mem::take(&mut self.spans);
        self.set.matches(p, &mut spans);
        let cut = if eof { p.len() } else { self.hold_from(p) };
        // Bytes before `pos` are out already (as themselves or inside a `***`).
        let mut pos = self.covered;
        for &(s, e) in &spans {
            if s >= cut {
                break;
            }
            if e <= pos {
                continue;
            }
            // A match that begins inside what is out continues that `***`.
            if s >= pos {
                out.extend_from_slice(&p[pos..s]);
                out.extend_from_slice(MASK);
            }
            pos = e;
        }
        if pos < cut {
            out.extend_from_slice(&p[pos..cut]);
            pos = cut;
        }
        // Shift the kept tail to the front in place: no reallocation leaves a copy behind,
        // and `Zeroizing<Vec>` wipes its spare capacity too when dropped.
        self.pending.copy_within(cut.., 0);
        let keep = self.pending.len() - cut;
        self.pending.truncate(keep);
        self.covered = if eof { 0 } else { pos - cut };
        self.spans = spans;
    }

    /// The first position whose suffix could still grow into a match.
    fn hold_from(&self, p: &[u8]) -> usize {
        let mut from = p.len().saturating_sub(self.set.max_len.saturating_sub(1));
        if let Some(last_unused) = p[from..].iter().rposition(|&b| !self.set.used[usize::from(b)]) {
            from += last_unused + 1;
        }
        (from..p.len())
            .find(|&q| self.set.first[usize::from(p[q])] && self.set.could_start(&p[q..]))
            .unwrap_or(p.len())
    }
}

/// Appends without letting `Vec` reallocate (which would free the old block unwiped): grows
/// into a fresh zeroizing buffer and lets the old one wipe itself on drop.
fn append_wiped(buf: &mut Zeroizing<Vec<u8>>, data: &[u8]) {
    if buf.capacity() - buf.len() < data.len() {
        let mut bigger = Zeroizing::new(Vec::with_capacity((buf.len() + data.len()).max(buf.capacity() * 2)));
        bigger.extend_from_slice(buf);
        *buf = bigger;
    }
    buf.extend_from_slice(data);
}

#[cfg(test)]
mod tests;
