//! `execve`, exit and uid/gid changes of callers, learned from the kernel (the proc
//! connector) instead of asked for on every request.
//!
//! A kept-alive connection is bound to its writer's facts at its first request (`ConnPeer`).
//! Without this module each later request re-checks them: `pidfd_send_signal` (still
//! alive?) and `readlink /proc/PID/exe` (same program?). With it, a connection holds a
//! [`Watch`] on its writer's pid; the reader thread counts every `EXEC`, `EXIT`, `UID` and
//! `GID` event of that pid (any thread of it), and a request is decided on the bound facts
//! without those two syscalls only when the [`Watch`] *vouches*:
//!
//! 1. the source is live (an even [`Source`] generation) and has been the same live
//!    subscription since the facts were last checked (`Mark::generation`): anything that
//!    can lose an event (an overflow reported as `ENOBUFS`, a failed socket, the reader
//!    thread ending) moves the generation on, so no earlier check is trusted again;
//! 2. no event for the pid has been counted since that check (`Mark::events`);
//! 3. every event the kernel queued before the request's last bytes were received has been
//!    counted. The kernel queues the event of an `execve` before the new program runs, so
//!    before it can write anything. A request is stamped (`now()`, `CLOCK_MONOTONIC`)
//!    after the `recvmsg` that returned its bytes; whoever empties the netlink queue records
//!    `drained_at`, a clock read taken *before* the `recv` that found it empty, after
//!    counting everything received before. `drained_at > stamp` proves condition 3: the
//!    event was queued before the stamp was read, which was before `drained_at` was read
//!    (the clock never goes back, and the inequality is strict), which was before the queue
//!    was found empty — so it had been received and counted. When the reader thread has not
//!    drained past the stamp, the request drains the queue itself (one `recv` that finds it
//!    empty; a request that finds another drain under way spins briefly for it, never
//!    blocks on it, and is re-checked if it does not finish).
//!
//! When a watch does not vouch, the caller is re-checked as before (pidfd, exe; with a
//! watch, also its effective uid and gid, which `UID`/`GID` events report), and a check
//! that passes takes a fresh [`Mark`] — read *before* the check, so an event that arrives
//! during it still counts against it. The cgroup re-check is not affected: moving between
//! cgroups is no event here.
//!
//! The source is unusable (and every request re-checked) without `CAP_NET_ADMIN` (needed
//! before Linux 6.6; later kernels let any process listen), outside
//! the initial pid namespace (the connector names processes by their pids there), or when
//! the kernel does not report the agent's own thread exiting (another network namespace,
//! a connector without the proc module). Never trusts an event's content beyond "something
//! happened to this pid": events only ever make the agent check more.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use crate::sys;

/// The moment a request's bytes were received, or a queue found empty: nanoseconds on
/// `CLOCK_MONOTONIC` (vDSO, no syscall) since the first call, never 0.
pub(crate) fn now() -> u64 {
    static BASE: LazyLock<Instant> = LazyLock::new(Instant::now);
    u64::try_from(BASE.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1
}

/// The agent's event source, once [`start`]ed.
pub(crate) fn global() -> Option<Arc<Source>> {
    GLOBAL.get().cloned()
}

static GLOBAL: OnceLock<Arc<Source>> = OnceLock::new();

/// Starts the reader thread (once per process) and returns the source; it logs whether
/// the kernel's events are in use and, if not, why.
pub(crate) fn start() -> Arc<Source> {
    let source = GLOBAL.get_or_init(|| Arc::new(Source::new()));
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let s = Arc::clone(source);
        let spawned =
            std::thread::Builder::new().name("kvbroker-events".into()).spawn(move || read_events(&s));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "exec/exit events inactive: cannot start their reader thread; \
                every request on a kept-alive connection re-checks its caller");
        }
    });
    Arc::clone(source)
}

/// One proc connector event: its type (`PROC_EVENT_*`), the thread and the process. An
/// acknowledgement of a subscription (`what` 0) carries its errno in `pid` and the
/// request's ack number plus one in `ack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Event {
    pub(crate) what: u32,
    pub(crate) pid: u32,
    pub(crate) tgid: u32,
    pub(crate) ack: u32,
}

/// What one non-blocking receive found.
#[derive(Debug)]
pub(crate) enum Recv {
    /// A datagram (its events, if any, handed over).
    Got,
    /// The queue is empty.
    Empty,
    /// The kernel dropped events (`ENOBUFS`).
    Overflow,
    Failed(io::Error),
}

/// Where events come from: the proc connector socket, or a test's queue.
pub(crate) trait EventSocket: Send + Sync {
    /// Receives one datagram without blocking, handing each event in it to `each`.
    fn recv(&self, each: &mut dyn FnMut(Event)) -> Recv;
    /// Blocks until something can be received, or `timeout_ms` passed.
    fn wait(&self, timeout_ms: i32) -> io::Result<()>;
}

/// The shared state of the event source: generation, drain clock, watched pids.
pub(crate) struct Source {
    /// Even: a live subscription, unchanged since this value was set, whose every event is
    /// counted or whose loss moved this on. Odd: no live subscription.
    generation: AtomicU64,
    /// A `now()` read before a `recv` found the queue empty, everything before it counted.
    drained_at: AtomicU64,
    /// The socket; its lock also serialises draining (received ⇒ counted before unlock).
    socket: Mutex<Option<Arc<dyn EventSocket>>>,
    /// Events counted per watched pid.
    pids: RwLock<HashMap<u32, Arc<AtomicU64>>>,
}

/// What a watch looked like when its facts were last checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mark {
    generation: u64,
    events: u64,
}

/// A connection's watch on its writer's pid; unregistered when dropped.
pub(crate) struct Watch {
    source: Arc<Source>,
    pid: u32,
    events: Arc<AtomicU64>,
}

/// At most this many datagrams per drain by a request: on a host whose processes exec and
/// exit faster than that, the request re-checks its caller (two system calls) rather than
/// pays for everyone's events; the reader thread drains the rest.
const REQUEST_DRAIN_LIMIT: usize = 32;

/// At most this many datagrams per turn of the reader thread, so a request waiting for the
/// lock gets its turn (it spins at most [`DRAIN_SPIN_NS`], then re-checks).
const READER_DRAIN_LIMIT: usize = 4096;

/// How long a request spins (no system call: `sched_yield` showed up at 0.16 per read under
/// load) for another drain to finish before it re-checks instead, in nanoseconds. A drain
/// is one `recv`, about a microsecond.
const DRAIN_SPIN_NS: u64 = 20_000;

impl Source {
    pub(crate) fn new() -> Self {
        Self {
            generation: AtomicU64::new(1),
            drained_at: AtomicU64::new(0),
            socket: Mutex::new(None),
            pids: RwLock::new(HashMap::new()),
        }
    }

    /// Whether a live subscription is in place now.
    pub(crate) fn active(&self) -> bool {
        self.generation.load(Ordering::Acquire).is_multiple_of(2)
    }

    /// Registers a watch on `pid`. Call it before reading the facts it is to vouch for.
    pub(crate) fn watch(self: &Arc<Self>, pid: u32) -> Watch {
        let mut pids = self.pids.write().unwrap_or_else(PoisonError::into_inner);
        let events = Arc::clone(pids.entry(pid).or_default());
        Watch { source: Arc::clone(self), pid, events }
    }

    /// Puts a proven, subscribed socket in use: from now on, checks can be vouched for.
    pub(crate) fn activate(&self, socket: Arc<dyn EventSocket>) {
        *self.socket.lock().unwrap_or_else(PoisonError::into_inner) = Some(socket);
        let _ = self
            .generation
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |g| (!g.is_multiple_of(2)).then_some(g + 1));
        crate::metrics::get().exec_events_active(true);
    }

    /// The subscription is gone (or cannot be trusted): nothing is vouched for until a new
    /// one is activated.
    pub(crate) fn lose(&self) {
        self.socket.lock().unwrap_or_else(PoisonError::into_inner).take();
        let _ = self
            .generation
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |g| g.is_multiple_of(2).then_some(g + 1));
        crate::metrics::get().exec_events_active(false);
    }

    /// Counts one event against its process's watch, if it has one.
    fn note(&self, ev: Event) {
        if ev.what & WATCHED == 0 {
            return;
        }
        if let Some(n) = self.pids.read().unwrap_or_else(PoisonError::into_inner).get(&ev.tgid) {
            n.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Drains `socket` until empty, with the socket lock held. `Ok(true)`: found empty,
    /// `drained_at` published; `Ok(false)`: gave up after `limit` datagrams.
    fn drain_locked(&self, socket: &dyn EventSocket, limit: usize) -> io::Result<bool> {
        for _ in 0..limit {
            let before = now();
            match socket.recv(&mut |ev| self.note(ev)) {
                Recv::Got => {}
                Recv::Empty => {
                    self.drained_at.fetch_max(before, Ordering::AcqRel);
                    return Ok(true);
                }
                Recv::Overflow => {
                    // Events were lost: no check made before now is vouched for again.
                    self.generation.fetch_add(2, Ordering::AcqRel);
                    crate::metrics::get().exec_events_lost();
                    tracing::debug!("proc connector overflowed: every kept-alive caller is re-checked once");
                }
                Recv::Failed(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// Drains the queue, unless someone already has since `stamp`; whether `drained_at`
    /// is now past `stamp`. Never blocks on another drainer (the reader thread could be
    /// stopped while draining): it spins up to [`DRAIN_SPIN_NS`] for a drain under way to
    /// finish, then gives up and the request is re-checked.
    fn drain_past(&self, stamp: u64) -> bool {
        let started = now();
        let guard = loop {
            match self.socket.try_lock() {
                Ok(g) => break g,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    if self.drained_at.load(Ordering::Acquire) > stamp {
                        return true;
                    }
                    if now().saturating_sub(started) > DRAIN_SPIN_NS {
                        return false;
                    }
                    std::hint::spin_loop();
                }
            }
        };
        if self.drained_at.load(Ordering::Acquire) > stamp {
            return true;
        }
        let Some(socket) = guard.as_ref() else { return false };
        match self.drain_locked(socket.as_ref(), REQUEST_DRAIN_LIMIT) {
            Ok(_) => self.drained_at.load(Ordering::Acquire) > stamp,
            Err(e) => {
                drop(guard);
                tracing::warn!(error = %e, "proc connector failed; re-checking callers until it is back");
                self.lose();
                false
            }
        }
    }

    /// The reader thread's turn: waits for events, then drains them.
    fn wait_and_drain(&self, timeout_ms: i32) -> io::Result<()> {
        let socket = self.socket.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let Some(socket) = socket else {
            return Err(io::Error::other("the socket was dropped after a failure"));
        };
        socket.wait(timeout_ms)?;
        let guard = self.socket.lock().unwrap_or_else(PoisonError::into_inner);
        match guard.as_ref() {
            Some(s) if Arc::ptr_eq(s, &socket) => {
                self.drain_locked(s.as_ref(), READER_DRAIN_LIMIT).map(|_| ())
            }
            _ => Err(io::Error::other("the socket was dropped after a failure")),
        }
    }
}

impl Watch {
    /// The watch's state now; take it before checking the facts it is to vouch for.
    pub(crate) fn mark(&self) -> Mark {
        let generation = self.source.generation.load(Ordering::Acquire);
        Mark { generation, events: self.events.load(Ordering::Acquire) }
    }

    /// Whether facts checked at `mark` still hold for a request whose bytes were all
    /// received by `stamp` (see the module doc for why this is sound).
    pub(crate) fn vouches(&self, mark: Mark, stamp: u64) -> bool {
        let src = &self.source;
        let live = |g: u64| g.is_multiple_of(2) && g == mark.generation;
        if !live(src.generation.load(Ordering::Acquire)) {
            return false;
        }
        if src.drained_at.load(Ordering::Acquire) <= stamp && !src.drain_past(stamp) {
            return false;
        }
        live(src.generation.load(Ordering::Acquire)) && self.events.load(Ordering::Acquire) == mark.events
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut pids = self.source.pids.write().unwrap_or_else(PoisonError::into_inner);
        // The map's reference and ours: nobody else watches this pid.
        if let Some(n) = pids.get(&self.pid)
            && Arc::ptr_eq(n, &self.events)
            && Arc::strong_count(n) == 2
        {
            pids.remove(&self.pid);
        }
    }
}

// === the proc connector ===

const PROC_EVENT_EXEC: u32 = 0x2;
const PROC_EVENT_UID: u32 = 0x4;
const PROC_EVENT_GID: u32 = 0x40;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;
/// The events that dirty a watch: a new program, an exit (of any thread: the last one's
/// ends the process, and a pid can be reused only after), new credentials.
const WATCHED: u32 = PROC_EVENT_EXEC | PROC_EVENT_EXIT | PROC_EVENT_UID | PROC_EVENT_GID;

const NLMSG_HDRLEN: usize = 16;
const CN_MSG_LEN: usize = 20;
const NLMSG_DONE: u16 = 3;
/// Offsets in a datagram: the proc event follows the netlink and connector headers; its
/// `event_data` (pid, tgid first for every event we read) follows `what`, `cpu` and an
/// 8-byte timestamp.
const EVENT_AT: usize = NLMSG_HDRLEN + CN_MSG_LEN;
const DATA_AT: usize = EVENT_AT + 16;

/// The proc connector socket.
struct Connector(OwnedFd);

impl EventSocket for Connector {
    fn recv(&self, each: &mut dyn FnMut(Event)) -> Recv {
        let mut buf = [0u8; 4096];
        match sys::netlink_recv(self.0.as_fd(), &mut buf) {
            // Only the kernel's messages: another process can send to our port, and although
            // an event can only make the agent check more, it need not be listened to.
            Ok((n, 0)) => {
                parse(&buf[..n], each);
                Recv::Got
            }
            Ok(_) => Recv::Got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Recv::Empty,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Recv::Got,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Recv::Overflow,
            Err(e) => Recv::Failed(e),
        }
    }

    fn wait(&self, timeout_ms: i32) -> io::Result<()> {
        sys::wait_readable(self.0.as_fd(), timeout_ms).map(|_| ())
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Hands each proc event in a datagram (one or more netlink messages) to `each`.
pub(crate) fn parse(mut datagram: &[u8], each: &mut dyn FnMut(Event)) {
    while let Some(len) = u32_at(datagram, 0).map(|l| l as usize) {
        if len < NLMSG_HDRLEN || len > datagram.len() {
            return;
        }
        let msg = &datagram[..len];
        let kind = u16::from_ne_bytes([msg[4], msg[5]]);
        let for_proc = u32_at(msg, NLMSG_HDRLEN) == Some(libc::CN_IDX_PROC)
            && u32_at(msg, NLMSG_HDRLEN + 4) == Some(libc::CN_VAL_PROC);
        if kind == NLMSG_DONE
            && for_proc
            && let (Some(what), Some(pid), Some(tgid), Some(ack)) = (
                u32_at(msg, EVENT_AT),
                u32_at(msg, DATA_AT),
                u32_at(msg, DATA_AT + 4),
                u32_at(msg, NLMSG_HDRLEN + 12),
            )
        {
            each(Event { what, pid, tgid, ack });
        }
        datagram = &datagram[len.next_multiple_of(4).min(datagram.len())..];
    }
}

/// The subscription request: `PROC_CN_MCAST_LISTEN`, with an event filter (`proc_input`,
/// Linux 6.6+; older kernels ignore a message of that size) or without. The kernel
/// acknowledges it to every listener with `ack + 1`.
pub(crate) fn listen_message(filtered: bool, ack: u32) -> Vec<u8> {
    let mut data = 1u32.to_ne_bytes().to_vec(); // PROC_CN_MCAST_LISTEN
    if filtered {
        data.extend_from_slice(&WATCHED.to_ne_bytes());
    }
    let total = EVENT_AT + data.len();
    let mut m = Vec::with_capacity(total);
    m.extend_from_slice(&u32::try_from(total).unwrap_or(0).to_ne_bytes());
    m.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes()); // flags
    m.extend_from_slice(&0u32.to_ne_bytes()); // seq
    m.extend_from_slice(&std::process::id().to_ne_bytes());
    m.extend_from_slice(&libc::CN_IDX_PROC.to_ne_bytes());
    m.extend_from_slice(&libc::CN_VAL_PROC.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // seq
    m.extend_from_slice(&ack.to_ne_bytes());
    m.extend_from_slice(&u16::try_from(data.len()).unwrap_or(0).to_ne_bytes());
    m.extend_from_slice(&0u16.to_ne_bytes()); // flags
    m.extend_from_slice(&data);
    m
}

/// Why the source cannot be used.
enum Unusable {
    /// Will not change while the agent runs (permissions, namespaces): give up.
    ForGood(String),
    /// May pass (a transient socket error): try again later.
    ForNow(String),
}

/// The receive buffer asked for: about 10,000 queued events (each costs ~ 1 KiB of buffer).
const RCVBUF: usize = 8 << 20;

/// Opens and subscribes a connector socket, and proves it reports the agent's own pids.
fn subscribe() -> Result<Arc<dyn EventSocket>, Unusable> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:")).map(|v| v.split_whitespace().count());
    if nspid != Some(1) {
        return Err(Unusable::ForGood(
            "the agent is not in the initial pid namespace, where the kernel's events name processes".into(),
        ));
    }
    let fd = sys::proc_connector_socket(RCVBUF).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => Unusable::ForGood(
            "listening to the proc connector needs CAP_NET_ADMIN before Linux 6.6 (run the agent as root)"
                .into(),
        ),
        Some(libc::EPROTONOSUPPORT | libc::EAFNOSUPPORT) => {
            Unusable::ForGood(format!("this kernel has no proc connector ({e})"))
        }
        _ => Unusable::ForNow(format!("cannot open a proc connector socket: {e}")),
    })?;
    let socket = Connector(fd);
    // Unique enough to tell our acknowledgement from other listeners' (each reaches every
    // listener).
    let ack = (now() as u32) | 1;
    // Unfiltered first: only then does the kernel's acknowledgement reach us (a filtered
    // listener's filter drops it), and only our own acknowledged subscription keeps events
    // coming — events delivered because another process listens could stop without notice.
    sys::netlink_send_to_kernel(socket.0.as_fd(), &listen_message(false, ack)).map_err(|e| {
        match e.raw_os_error() {
            // The connector exists only in the initial network namespace.
            Some(libc::ECONNREFUSED) => Unusable::ForGood(format!(
                "cannot subscribe to the proc connector ({e}): the agent is not in the initial network namespace"
            )),
            _ => Unusable::ForNow(format!("cannot subscribe to the proc connector: {e}")),
        }
    })?;
    match proven(&socket, ack.wrapping_add(1)) {
        Proof::Both => {}
        Proof::Refused(errno) => {
            return Err(Unusable::ForGood(format!(
                "the kernel refused the proc connector subscription: {}",
                io::Error::from_raw_os_error(i32::try_from(errno).unwrap_or(0))
            )));
        }
        Proof::NoAck => {
            return Err(Unusable::ForGood(
                "the kernel did not acknowledge the proc connector subscription".into(),
            ));
        }
        Proof::NoExit => {
            return Err(Unusable::ForGood(
                "the proc connector did not report the agent's own thread exiting (another \
                 network namespace?)"
                    .into(),
            ));
        }
    }
    // Then narrow it to the events we count (Linux 6.6+; older kernels ignore this message
    // and keep sending everything, which is only more work).
    if let Err(e) = sys::netlink_send_to_kernel(socket.0.as_fd(), &listen_message(true, ack.wrapping_add(2)))
    {
        tracing::debug!(error = %e, "cannot narrow the proc connector subscription; receiving every event");
    }
    Ok(Arc::new(socket))
}

/// What [`proven`] saw.
enum Proof {
    /// Our subscription acknowledged, and our own thread's exit reported.
    Both,
    Refused(u32),
    NoAck,
    NoExit,
}

/// Waits (up to 2 s) for the kernel's acknowledgement of *our* subscription and for the
/// `EXIT` event of a thread started here, with the pids this process sees: proof that
/// events flow and name processes as the agent does.
fn proven(socket: &Connector, ack: u32) -> Proof {
    let tid = std::thread::spawn(|| {
        std::fs::read_link("/proc/thread-self")
            .ok()
            .and_then(|p| p.file_name()?.to_str()?.parse::<u32>().ok())
    })
    .join()
    .ok()
    .flatten();
    let Some(tid) = tid else { return Proof::NoExit };
    let me = std::process::id();
    let deadline = Instant::now() + Duration::from_secs(2);
    let (mut acked, mut refused, mut exited) = (false, None, false);
    while !(acked && exited) && refused.is_none() && Instant::now() < deadline {
        let mut each = |ev: Event| match ev.what {
            0 if ev.ack == ack && ev.pid == 0 => acked = true,
            0 if ev.ack == ack => refused = Some(ev.pid),
            PROC_EVENT_EXIT if ev.pid == tid && ev.tgid == me => exited = true,
            _ => {}
        };
        match socket.recv(&mut each) {
            Recv::Empty => {
                if socket.wait(100).is_err() {
                    return Proof::NoExit;
                }
            }
            Recv::Got | Recv::Overflow => {}
            Recv::Failed(_) => return Proof::NoExit,
        }
    }
    match (refused, acked, exited) {
        (Some(errno), ..) => Proof::Refused(errno),
        (None, true, true) => Proof::Both,
        (None, false, _) => Proof::NoAck,
        (None, true, false) => Proof::NoExit,
    }
}

/// The reader thread: subscribes, drains as events come, re-subscribes after a failure;
/// gives up (and the agent re-checks every request) when the source cannot work here.
fn read_events(source: &Arc<Source>) {
    /// Whatever ends this thread (a panic included), nothing is vouched for after.
    struct Ending<'a>(&'a Source);
    impl Drop for Ending<'_> {
        fn drop(&mut self) {
            self.0.lose();
        }
    }
    let _ending = Ending(source);
    let mut backoff = Duration::from_secs(1);
    let mut was_active = false;
    loop {
        match subscribe() {
            Ok(socket) => {
                source.activate(socket);
                tracing::info!(
                    "exec/exit events active (proc connector): a kept-alive connection's caller \
                     is re-checked only after the kernel reports an exec, exit or id change"
                );
                was_active = true;
                backoff = Duration::from_secs(1);
                while source.wait_and_drain(1000).is_ok() {}
                tracing::warn!(
                    "exec/exit events lost (proc connector failed): re-checking every kept-alive \
                     caller until re-subscribed"
                );
                source.lose();
            }
            Err(Unusable::ForGood(why)) => {
                let what = if was_active { "lost" } else { "inactive" };
                tracing::info!(
                    reason = why.as_str(),
                    "exec/exit events {what}: every request on a kept-alive connection re-checks \
                     its caller through /proc and its pidfd"
                );
                return;
            }
            Err(Unusable::ForNow(why)) => {
                tracing::warn!(
                    reason = why.as_str(),
                    retry_secs = backoff.as_secs(),
                    "exec/exit events inactive for now: re-checking every kept-alive caller"
                );
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

#[cfg(test)]
mod tests;
