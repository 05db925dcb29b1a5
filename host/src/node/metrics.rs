//! `GET /v1/metrics`: the host's status in the Prometheus text format
//! (version 0.0.4), for a scraper or `curl`. Built from the same
//! [`HostStatus`] that `GET /v1/status` answers; docs/host.md lists the
//! metrics.

use std::fmt::Write as _;

use super::api::HostStatus;
use crate::vp::{Recent, VpStatus};

/// The content type of the answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One metric family: its `# HELP` and `# TYPE` lines, then its samples.
struct Family<'a> {
    out: &'a mut String,
    name: &'a str,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &'a str, kind: &str, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out, name }
    }

    /// One sample of the family (every sample carries the family's name).
    fn sample(&mut self, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{key}=\"{}\"", escape(val));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn gauge(out: &mut String, name: &str, help: &str, value: f64) {
    Family::new(out, name, "gauge", help).sample(&[], value);
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    Family::new(out, name, "counter", help).sample(&[], value as f64);
}

/// A per-member family: one sample per virtual peer this host runs a member of.
fn per_member(
    out: &mut String,
    vps: &[VpStatus],
    name: &str,
    kind: &str,
    help: &str,
    value: impl Fn(&VpStatus) -> f64,
) {
    let mut family = Family::new(out, name, kind, help);
    for s in vps {
        let name_label = s.name.as_deref().unwrap_or("");
        family.sample(&[("vp", &s.vp), ("name", name_label)], value(s));
    }
}

/// A per-member duration family from the member's recent samples
/// (`vp-host status <vp>` shows the same): p50, p99 and max in seconds.
fn per_member_timing(
    out: &mut String,
    vps: &[VpStatus],
    name: &str,
    help: &str,
    recent: impl Fn(&VpStatus) -> &Recent,
) {
    let mut family = Family::new(out, name, "gauge", help);
    for s in vps {
        let r = recent(s);
        if r.samples == 0 {
            continue;
        }
        let name_label = s.name.as_deref().unwrap_or("");
        for (quantile, us) in [("0.5", r.p50_us), ("0.99", r.p99_us), ("1", r.max_us)] {
            family.sample(
                &[("vp", &s.vp), ("name", name_label), ("quantile", quantile)],
                us as f64 / 1e6,
            );
        }
    }
}

/// The whole answer.
pub fn render(status: &HostStatus) -> String {
    let mut text = String::with_capacity(4096 + 2048 * status.virtual_peers.len());
    let out = &mut text;
    Family::new(
        out,
        "vp_host_info",
        "gauge",
        "This host: 1, labelled with its ids and version.",
    )
    .sample(
        &[
            ("host_id", &status.host_id),
            ("peer_id", &status.peer_id),
            ("version", &status.version),
        ],
        1.0,
    );
    let c = &status.counters;
    counter(
        out,
        "vp_host_frames_sent_total",
        "Frames written to other hosts.",
        c.frames_sent,
    );
    counter(
        out,
        "vp_host_bytes_sent_total",
        "Bytes of frames written to other hosts.",
        c.bytes_sent,
    );
    counter(
        out,
        "vp_host_frames_received_total",
        "Frames read from other hosts.",
        c.frames_received,
    );
    Family::new(
        out,
        "vp_host_frames_dropped_total",
        "counter",
        "Frames not sent: the peer's queue was full, or the peer could not be reached.",
    )
    .sample(
        &[("reason", "queue_full")],
        c.frames_dropped_queue_full as f64,
    )
    .sample(
        &[("reason", "unreachable")],
        c.frames_dropped_unreachable as f64,
    );
    counter(
        out,
        "vp_host_bad_frames_total",
        "Frames that did not decode (each closed its connection).",
        c.bad_frames,
    );
    counter(
        out,
        "vp_host_connection_errors_total",
        "Failed connections and dials.",
        c.connection_errors,
    );
    gauge(
        out,
        "vp_host_connected_peers",
        "Hosts connected now.",
        status.connected_peers.len() as f64,
    );
    gauge(
        out,
        "vp_host_overlay_joined",
        "1 once this host's key is linked at every level of the skip graph.",
        f64::from(u8::from(status.overlay.joined)),
    );
    gauge(
        out,
        "vp_host_memberships",
        "Virtual peers this host runs a member of.",
        status.virtual_peers.len() as f64,
    );
    gauge(
        out,
        "vp_host_memberships_max",
        "The most it takes (--memberships-max).",
        status.memberships_max as f64,
    );
    gauge(
        out,
        "vp_host_draining",
        "1 while the host is leaving (vp-host drain).",
        f64::from(u8::from(status.draining)),
    );
    gauge(
        out,
        "vp_host_guest_memory_committed_bytes",
        "The sum of its members' guest memory limits.",
        status.guest_memory_committed as f64,
    );
    gauge(
        out,
        "vp_host_guest_memory_max_bytes",
        "The most that sum may reach (--guest-memory-max).",
        status.guest_memory_max as f64,
    );
    let vps = &status.virtual_peers;
    per_member(
        out,
        vps,
        "vp_member_leader",
        "gauge",
        "1 if this host's member leads.",
        |s| f64::from(u8::from(s.role == "leader")),
    );
    per_member(
        out,
        vps,
        "vp_member_epoch",
        "gauge",
        "The configuration epoch.",
        |s| s.epoch as f64,
    );
    per_member(
        out,
        vps,
        "vp_member_voters",
        "gauge",
        "Voting members.",
        |s| s.voters.len() as f64,
    );
    per_member(
        out,
        vps,
        "vp_member_learners",
        "gauge",
        "Members still receiving the state.",
        |s| s.learners.len() as f64,
    );
    per_member(
        out,
        vps,
        "vp_member_replacing",
        "gauge",
        "1 while the leader replaces a member.",
        |s| f64::from(u8::from(s.replacing.is_some())),
    );
    per_member(
        out,
        vps,
        "vp_member_decided_below",
        "gauge",
        "Slots decided: every slot below this one.",
        |s| s.decided_below as f64,
    );
    per_member(
        out,
        vps,
        "vp_member_applied_below",
        "gauge",
        "Slots applied: every slot below this one.",
        |s| s.applied_below as f64,
    );
    per_member(
        out,
        vps,
        "vp_member_snapshot_slot",
        "gauge",
        "The slot of the latest checkpoint.",
        |s| s.snapshot_slot as f64,
    );
    per_member(
        out,
        vps,
        "vp_member_state_bytes",
        "gauge",
        "The guest's state (linear memory and globals).",
        |s| s.state_bytes as f64,
    );
    per_member(
        out,
        vps,
        "vp_member_guest_handled_total",
        "counter",
        "Messages the guest handled.",
        |s| s.guest_handled as f64,
    );
    per_member(
        out,
        vps,
        "vp_member_outbox",
        "gauge",
        "Messages to other virtual peers not yet answered.",
        |s| s.outbox as f64,
    );
    per_member_timing(
        out,
        vps,
        "vp_member_log_write_seconds",
        "One group commit on the member's log (write and fdatasync), over its latest samples.",
        |s| &s.timings.log_write,
    );
    per_member_timing(
        out,
        vps,
        "vp_member_commit_seconds",
        "Leader only: a slot from its accept sent to decided, over its latest samples.",
        |s| &s.timings.commit,
    );
    per_member_timing(
        out,
        vps,
        "vp_member_request_seconds",
        "Leader only: a request from proposed to answered, over its latest samples.",
        |s| &s.timings.request,
    );
    per_member_timing(
        out,
        vps,
        "vp_member_checkpoint_seconds",
        "A checkpoint's pause of the member thread (encoding the guest), over its latest samples.",
        |s| &s.timings.checkpoint,
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("x\ny"), "x\\ny");
    }

    #[test]
    fn every_line_is_a_comment_or_a_sample_and_families_are_declared_once() {
        let status: HostStatus = serde_json::from_value(serde_json::json!({
            "peer_id": "12D3KooWtest", "host_id": "00000000000000aa", "version": "0.1.0",
            "data_dir": "/tmp/x", "listen_addrs": [], "connected_peers": [],
            "counters": {"frames_sent": 5, "bytes_sent": 500, "frames_received": 4,
                "frames_dropped_queue_full": 1, "frames_dropped_unreachable": 2,
                "bad_frames": 0, "connection_errors": 0},
            "private_network": null,
            "overlay": {"joined": true, "keys": [], "ops_in_flight": 0, "stats": {}},
            "virtual_peers": [{
                "vp": "00000000000000bb", "host": "00000000000000aa", "name": "q\"x",
                "module": "m", "role": "leader", "epoch": 3, "leader": null,
                "voters": ["a", "b", "c"], "learners": [], "decided_below": 10,
                "applied_below": 9, "snapshot_slot": 0, "state_bytes": 1024,
                "state_digest": null, "outbox": 0, "guest_handled": 8, "replacing": null,
                "timings": {"log_write": {"samples": 2, "p50_us": 150, "p99_us": 300, "max_us": 400},
                    "commit": {"samples": 0, "p50_us": 0, "p99_us": 0, "max_us": 0},
                    "request": {"samples": 0, "p50_us": 0, "p99_us": 0, "max_us": 0}}
            }],
            "memberships_max": 1024, "draining": false,
            "guest_memory_committed": 268435456, "guest_memory_max": 1073741824
        }))
        .unwrap();
        let text = render(&status);
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(declared.insert(name.to_string()), "{name} declared twice");
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
            let name = series.split('{').next().unwrap();
            assert!(declared.contains(name), "{name} used before its TYPE line");
        }
        assert!(text.contains("vp_host_frames_dropped_total{reason=\"unreachable\"} 2\n"));
        assert!(
            text.contains("vp_member_applied_below{vp=\"00000000000000bb\",name=\"q\\\"x\"} 9\n")
        );
        assert!(text.contains(
            "vp_member_log_write_seconds{vp=\"00000000000000bb\",name=\"q\\\"x\",quantile=\"0.5\"} 0.00015\n"
        ));
        // no samples, no series (and a status from before checkpoints were
        // timed, without the field, reads as none)
        assert!(!text.contains("vp_member_commit_seconds{"));
        assert!(!text.contains("vp_member_checkpoint_seconds{"));
        assert!(text.contains("vp_member_leader{vp=\"00000000000000bb\",name=\"q\\\"x\"} 1\n"));
    }
}
