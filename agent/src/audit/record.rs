//! A record's members, serialized before the writer takes its turn, and the borrowed form of
//! an allowed read's record.
//!
//! The writer owns `seq`, `ts`, `prev` and `hash`; everything else a record says is its
//! *fields*: the JSON object of the members between `ts` and `prev`, exactly as
//! [`AuditRecord`]'s serde form writes them (`{"event":…,…}`). The writer splices them into
//! `{"seq":N,"ts":"T",…,"prev":"P"}`, so a line's bytes do not depend on which form a
//! record came in. An allowed read is written from [`ReadRecord`], which borrows every name
//! from the request and the caller's connection instead of copying each into a `String`
//! (the read path's allocations were most of its cost); every other record goes through
//! [`AuditRecord`]. The tests below hold the two forms to the same bytes.
//!
//! Never holds a value or a token: the fields are names, versions, ids and process facts.

use kvbroker_proto::{AuditRecord, CacheState, Event, Outcome, PeerInfo};
use serde::Serialize;

/// Something the writer can put in the log: it writes its fields object into `out`.
pub(crate) trait Fields {
    /// Appends `{"event":…,…}` (the members between `ts` and `prev`) to `out`; on an error,
    /// what it appended is to be cut off, and the record is not written.
    fn write_fields(&self, out: &mut Vec<u8>) -> Result<(), Unwritable>;
}

/// A record that cannot be made into a line. Not expected to happen (plain data, written
/// into memory); if it does, the record is refused rather than written as something else,
/// and the request it records fails closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the audit record could not be serialized ({0})")]
pub(crate) struct Unwritable(pub(crate) &'static str);

impl Fields for AuditRecord {
    fn write_fields(&self, out: &mut Vec<u8>) -> Result<(), Unwritable> {
        // The rare records (start, stop, refusals, version changes): serialize the whole
        // record and keep what lies between `ts` and `prev`. `seq` (a number) and `ts` come
        // first and cannot hold `"event":`; a string member never holds the bytes
        // `,"prev":"` unescaped, so the last of them starts `prev`.
        let whole = serde_json::to_vec(self).map_err(|_| Unwritable("serde_json refused the record"))?;
        let start = find(&whole, br#""event":"#);
        let end = rfind(&whole, br#","prev":""#);
        match (start, end) {
            (Some(s), Some(e)) if s < e => {
                out.push(b'{');
                out.extend_from_slice(&whole[s..e]);
                out.push(b'}');
                Ok(())
            }
            _ => Err(Unwritable("no event or prev member")),
        }
    }
}

/// A fields object serialized earlier (a queued record, checked when it was serialized).
impl Fields for Vec<u8> {
    fn write_fields(&self, out: &mut Vec<u8>) -> Result<(), Unwritable> {
        out.extend_from_slice(self);
        Ok(())
    }
}

/// An allowed `secret.read`, borrowing everything. Its members are [`AuditRecord`]'s, in the
/// same order, with the same names and the same rule for leaving a member out.
#[derive(Serialize)]
pub(crate) struct ReadRecord<'a> {
    pub(crate) event: Event,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) outcome: Option<Outcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) request_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) peer: Option<PeerOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) secret: Option<SecretView<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rule: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cache: Option<CacheState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) upstream_request_id: Option<&'a str>,
}

impl Fields for ReadRecord<'_> {
    fn write_fields(&self, out: &mut Vec<u8>) -> Result<(), Unwritable> {
        serde_json::to_writer(&mut *out, self).map_err(|_| Unwritable("serde_json refused the record"))
    }
}

/// Appends the body of a line (what the hash covers): `{"seq":N,"ts":"T",FIELDS…,"prev":"P"}`,
/// where `fields` writes a [`Fields`] object. `ts` and `prev` are ours (RFC 3339 and
/// lowercase hex): nothing in them needs escaping. On an error `out` is as it was.
pub(super) fn body(
    out: &mut Vec<u8>,
    seq: u64,
    ts: impl std::fmt::Display,
    fields: impl FnOnce(&mut Vec<u8>) -> Result<(), Unwritable>,
    prev: &str,
) -> Result<(), Unwritable> {
    use std::io::Write as _;
    let line_at = out.len();
    // Writing into a Vec cannot fail.
    let _ = write!(out, r#"{{"seq":{seq},"ts":"{ts}""#);
    let at = out.len();
    let written = fields(out);
    // The fields object's `{` becomes the `,` after `ts`; its `}` closes the line after `prev`.
    // Anything but one object with at least one member would make another record's line.
    let object = out.len() > at + 2 && out.get(at) == Some(&b'{') && out.last() == Some(&b'}');
    if let Err(e) = written.and_then(|()| object.then_some(()).ok_or(Unwritable("not a JSON object"))) {
        out.truncate(line_at);
        return Err(e);
    }
    out[at] = b',';
    out.pop();
    out.extend_from_slice(br#","prev":""#);
    out.extend_from_slice(prev.as_bytes());
    out.extend_from_slice(b"\"}");
    Ok(())
}

/// A record's `peer`: borrowed facts, or the same facts serialized earlier (once per
/// connection: a kept-alive caller's facts do not change between its reads).
#[derive(Serialize)]
#[serde(untagged)]
pub(crate) enum PeerOut<'a> {
    View(PeerView<'a>),
    Json(&'a serde_json::value::RawValue),
}

/// [`PeerInfo`], borrowed.
#[derive(Serialize, Default)]
pub(crate) struct PeerView<'a> {
    pub(crate) pid: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    #[serde(skip_serializing_if = "<[u32]>::is_empty")]
    pub(crate) groups: &'a [u32],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) exe: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) exe_unverified: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) connected_pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) exe_sha256: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cgroup: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) unit: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) container_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) k8s_namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) k8s_service_account: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) k8s_pod_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) k8s_pod_uid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) k8s_container_name: Option<&'a str>,
}

impl<'a> PeerView<'a> {
    /// A view of facts already made into a [`PeerInfo`].
    pub(crate) fn of_info(p: &'a PeerInfo) -> Self {
        Self {
            pid: p.pid,
            uid: p.uid,
            gid: p.gid,
            groups: &p.groups,
            exe: p.exe.as_deref(),
            exe_unverified: p.exe_unverified.as_deref(),
            connected_pid: p.connected_pid,
            exe_sha256: p.exe_sha256.as_deref(),
            cgroup: p.cgroup.as_deref(),
            unit: p.unit.as_deref(),
            container_id: p.container_id.as_deref(),
            k8s_namespace: p.k8s_namespace.as_deref(),
            k8s_service_account: p.k8s_service_account.as_deref(),
            k8s_pod_name: p.k8s_pod_name.as_deref(),
            k8s_pod_uid: p.k8s_pod_uid.as_deref(),
            k8s_container_name: p.k8s_container_name.as_deref(),
        }
    }
}

/// [`kvbroker_proto::SecretRef`] of a read, borrowed.
#[derive(Serialize)]
pub(crate) struct SecretView<'a> {
    pub(crate) vault: &'a str,
    pub(crate) name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) version: Option<&'a str>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use kvbroker_proto::SecretRef;

    use super::*;

    fn fields(f: &dyn Fields) -> String {
        let mut out = Vec::new();
        f.write_fields(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// The body the writer makes of `f`, and the record's own serde form of the same body.
    fn bodies(f: &dyn Fields, r: &AuditRecord) -> (String, String) {
        let mut out = b"earlier lines\n".to_vec();
        let at = out.len();
        body(&mut out, 42, "2026-11-22T10:00:00.123456Z", |o| f.write_fields(o), &"e".repeat(64)).unwrap();
        let mut whole = r.clone();
        (whole.seq, whole.ts, whole.prev, whole.hash) =
            (42, "2026-11-22T10:00:00.123456Z".into(), "e".repeat(64), None);
        (String::from_utf8(out[at..].to_vec()).unwrap(), serde_json::to_string(&whole).unwrap())
    }

    fn full_peer() -> PeerInfo {
        PeerInfo {
            pid: 7,
            uid: 1000,
            gid: 100,
            groups: vec![4, 27],
            exe: Some("/opt/conda/bin/python3.11".into()),
            exe_unverified: Some("bind \"mount\"\n".into()),
            connected_pid: Some(6),
            exe_sha256: Some("ab".repeat(32)),
            cgroup: Some("/system.slice/train.service".into()),
            unit: Some("train.service".into()),
            container_id: Some("c".repeat(64)),
            k8s_namespace: Some("ml".into()),
            k8s_service_account: Some("trainer".into()),
            k8s_pod_name: Some("job-0".into()),
            k8s_pod_uid: Some("0f0e".into()),
            k8s_container_name: Some("main".into()),
        }
    }

    /// The two forms of an allowed read agree byte for byte, with every member present and
    /// with each optional one left out in turn (a member in the wrong place or spelled
    /// differently would change the line, and so its hash).
    #[test]
    fn a_read_record_writes_what_the_audit_record_writes() {
        let full = full_peer();
        for drop in 0..=20 {
            let mut p = full.clone();
            let mut r = AuditRecord::new(Event::SecretRead);
            r.outcome = Some(Outcome::Allowed);
            r.request_id = Some("0123456789abcdef0123456789abcdef".into());
            r.rule = Some("train \"jobs\"".into());
            r.reason = Some("not modified (long poll ended with no new version)".into());
            r.cache = Some(CacheState::Miss);
            r.upstream_request_id = Some("f00d".into());
            let mut secret = SecretRef {
                vault: "default".into(),
                name: "db-password".into(),
                version: Some("9f1c".into()),
                previous_version: None,
            };
            match drop {
                0 => {}
                1 => p.groups.clear(),
                2 => p.exe = None,
                3 => p.exe_unverified = None,
                4 => p.connected_pid = None,
                5 => p.exe_sha256 = None,
                6 => p.cgroup = None,
                7 => p.unit = None,
                8 => p.container_id = None,
                9 => p.k8s_namespace = None,
                10 => p.k8s_service_account = None,
                11 => p.k8s_pod_name = None,
                12 => p.k8s_pod_uid = None,
                13 => p.k8s_container_name = None,
                14 => secret.version = None,
                15 => r.rule = None,
                16 => r.reason = None,
                17 => r.cache = None,
                18 => r.upstream_request_id = None,
                19 => r.request_id = None,
                _ => r.outcome = None,
            }
            r.peer = Some(p.clone());
            r.secret = Some(secret.clone());
            // The peer as borrowed facts, and as the same facts serialized earlier.
            let peer_json = serde_json::value::to_raw_value(&PeerView::of_info(&p)).unwrap();
            for form in 0..2 {
                let rr = ReadRecord {
                    event: r.event,
                    outcome: r.outcome,
                    request_id: r.request_id.as_deref(),
                    peer: Some(if form == 0 {
                        PeerOut::View(PeerView::of_info(&p))
                    } else {
                        PeerOut::Json(&peer_json)
                    }),
                    secret: Some(SecretView {
                        vault: &secret.vault,
                        name: &secret.name,
                        version: secret.version.as_deref(),
                    }),
                    rule: r.rule.as_deref(),
                    reason: r.reason.as_deref(),
                    cache: r.cache,
                    upstream_request_id: r.upstream_request_id.as_deref(),
                };
                assert_eq!(fields(&rr), fields(&r), "case {drop}, form {form}");
                let (ours, serde) = bodies(&rr, &r);
                assert_eq!(ours, serde, "case {drop}, form {form}");
            }
        }
    }

    /// An audit record's fields are its serde form minus `seq`, `ts`, `prev` and `hash`,
    /// whatever its strings hold (quotes, `"prev":` look-alikes, control characters).
    #[test]
    fn audit_record_fields_are_its_members_between_ts_and_prev() {
        let mut r = AuditRecord::new(Event::PolicyReload);
        r.seq = 12;
        r.ts = "2026-11-22T10:00:00.123456Z".into();
        r.prev = "0".repeat(64);
        r.outcome = Some(Outcome::Failed);
        r.reason = Some(r#"x","prev":"y "event": \n"#.into());
        r.peer = Some(full_peer());
        r.policy_sha256 = Some("a".repeat(64));
        let (ours, serde) = bodies(&r, &r);
        assert_eq!(ours, serde);
        r.hash = Some("b".repeat(64));
        let (ours, serde) = bodies(&r, &r);
        assert_eq!(ours, serde, "a hash already set is not part of the fields");
        let bare = AuditRecord::new(Event::AgentStop);
        assert_eq!(fields(&bare), r#"{"event":"agent.stop"}"#);
    }

    /// Fields that are not one JSON object with members are refused and leave the buffer as
    /// it was: no other record's line, no empty record, no half line.
    #[test]
    fn fields_that_are_not_an_object_are_refused_and_leave_nothing() {
        for bad in [&b""[..], b"{}", b"[1]", b"\"event\"", b"{\"event\":1"] {
            let mut out = b"earlier\n".to_vec();
            let got = body(&mut out, 1, "t", |o| bad.to_vec().write_fields(o), "p");
            assert!(got.is_err(), "{:?}", String::from_utf8_lossy(bad));
            assert_eq!(out, b"earlier\n");
        }
        let mut out = Vec::new();
        let failed = body(
            &mut out,
            1,
            "t",
            |o| {
                o.extend_from_slice(b"{\"event\":");
                Err(Unwritable("test"))
            },
            "p",
        );
        assert_eq!(failed, Err(Unwritable("test")));
        assert!(out.is_empty());
    }
}
