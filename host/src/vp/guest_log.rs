//! The lines a member's guest logged lately (`vp_guest_sdk::info!` and
//! friends), for `vp-host logs`. Not replicated and not persisted: every
//! member logs the same lines as it applies the same messages, so any member
//! can answer; a member that started from a snapshot has only the lines
//! logged since, and a restarted one those of the log suffix it re-applied.

use std::collections::VecDeque;

use super::{GuestLogEntry, LogCursor};
use crate::sandbox::GuestLogLine;

/// Lines kept per member, at most.
pub const GUEST_LOG_LINES_MAX: usize = 1000;
/// Bytes of text kept per member, at most.
pub const GUEST_LOG_BYTES_MAX: usize = 256 << 10;
/// Lines in one answer, at most.
pub const GUEST_LOG_ANSWER_MAX: usize = 200;

#[derive(Debug, Default)]
pub struct GuestLog {
    lines: VecDeque<GuestLogEntry>,
    bytes: usize,
    /// The slot of the latest line, and how many lines that slot wrote.
    at: LogCursor,
    /// Lines at or before this cursor may be missing here: dropped to keep
    /// the limits, or never seen (this member started from a snapshot).
    gap_to: LogCursor,
}

impl GuestLog {
    /// Keep a line the messages of `slot` wrote (slots never go back).
    pub fn push(&mut self, slot: u64, time_ms: u64, line: GuestLogLine) {
        self.at = if slot == self.at.0 {
            (slot, self.at.1 + 1)
        } else {
            (slot, 1)
        };
        let level = match line.level {
            0 => "trace",
            1 => "debug",
            2 => "info",
            3 => "warn",
            _ => "error",
        };
        self.bytes += line.text.len();
        self.lines.push_back(GuestLogEntry {
            slot,
            n: self.at.1,
            time_ms,
            level: level.to_string(),
            text: line.text,
        });
        while self.lines.len() > GUEST_LOG_LINES_MAX || self.bytes > GUEST_LOG_BYTES_MAX {
            let Some(old) = self.lines.pop_front() else {
                break;
            };
            self.bytes -= old.text.len();
            self.gap_to = self.gap_to.max(old.cursor());
        }
    }

    /// Lines, oldest first, at most `GUEST_LOG_ANSWER_MAX`, and how many kept
    /// lines before them the answer leaves out. From the start (`(0, 0)`):
    /// the latest lines, as `tail` shows them. After a line's cursor: the
    /// next lines after it, so that a reader asking again after the last
    /// line it got (a full answer: at once) pages through every kept line.
    pub fn after(&self, cursor: LogCursor) -> (Vec<GuestLogEntry>, u64) {
        let after = self.lines.partition_point(|l| l.cursor() <= cursor);
        let (first, end) = if cursor == (0, 0) {
            (
                self.lines.len().saturating_sub(GUEST_LOG_ANSWER_MAX),
                self.lines.len(),
            )
        } else {
            (after, self.lines.len().min(after + GUEST_LOG_ANSWER_MAX))
        };
        let lines = self.lines.range(first..end).cloned().collect();
        (lines, (first - after) as u64)
    }

    /// Whether lines after `cursor` may be missing from this member's record
    /// (a reader that asked after it lost them: its reads were too far apart,
    /// or this member started from a snapshot taken after it).
    pub fn gap_after(&self, cursor: LogCursor) -> bool {
        cursor != (0, 0) && cursor < self.gap_to
    }

    /// The state now comes from a snapshot of `slot`: the lines its messages
    /// wrote are not here. Lines of later slots are forgotten (the log after
    /// the snapshot is applied again and writes them again).
    pub fn restart_at(&mut self, slot: u64) {
        if slot < self.at.0 {
            self.lines.clear();
            self.bytes = 0;
            self.at = (slot, 0);
        }
        if slot > 0 {
            self.gap_to = self.gap_to.max((slot, u32::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str) -> GuestLogLine {
        GuestLogLine {
            level: 2,
            text: text.to_string(),
        }
    }

    #[test]
    fn lines_are_numbered_per_slot_read_after_a_cursor_and_bounded() {
        let mut log = GuestLog::default();
        log.push(3, 10, line("a"));
        log.push(3, 10, line("b"));
        log.push(5, 11, line("c"));
        let (all, skipped) = log.after((0, 0));
        assert_eq!(skipped, 0);
        let at: Vec<(u64, u32, &str)> =
            all.iter().map(|l| (l.slot, l.n, l.text.as_str())).collect();
        assert_eq!(at, vec![(3, 1, "a"), (3, 2, "b"), (5, 1, "c")]);
        assert_eq!(all[0].level, "info");
        assert_eq!(log.after((3, 1)).0.len(), 2);
        assert_eq!(log.after((5, 1)), (vec![], 0));
        // An answer holds the latest lines; the store the latest 1,000.
        for i in 0..1500 {
            log.push(10 + i / 7, 12, line(&format!("x{i}")));
        }
        let (tail, skipped) = log.after((0, 0));
        assert_eq!(tail.len(), GUEST_LOG_ANSWER_MAX);
        assert_eq!(skipped, (GUEST_LOG_LINES_MAX - GUEST_LOG_ANSWER_MAX) as u64);
        assert_eq!(tail.last().unwrap().text, "x1499");
        assert_eq!(log.lines.len(), GUEST_LOG_LINES_MAX);
        assert_eq!(log.lines[0].text, "x500");
        // After a cursor, the next lines: a reader pages through all of them.
        let mut cursor = log.lines[0].cursor();
        let mut seen = vec![log.lines[0].text.clone()];
        loop {
            let (page, skipped) = log.after(cursor);
            assert_eq!(skipped, 0);
            assert!(page.len() <= GUEST_LOG_ANSWER_MAX);
            let Some(last) = page.last() else { break };
            cursor = last.cursor();
            seen.extend(page.iter().map(|l| l.text.clone()));
        }
        let kept: Vec<String> = log.lines.iter().map(|l| l.text.clone()).collect();
        assert_eq!(seen, kept);
        // A reader whose cursor is older than the oldest kept line is told
        // that lines after it are gone; one at the oldest kept line is not.
        assert!(log.gap_after((10, 1)));
        assert!(log.gap_after((10 + 499 / 7, 2)));
        assert!(!log.gap_after(log.lines[0].cursor()));
        assert!(!log.gap_after((0, 0)));
        // and at most 256 KiB of text
        let big = "y".repeat(4096);
        for _ in 0..100 {
            log.push(1000, 13, line(&big));
        }
        assert!(log.bytes <= GUEST_LOG_BYTES_MAX);
        assert_eq!(log.lines.len(), GUEST_LOG_BYTES_MAX / 4096);
        // A snapshot from before the latest line starts the count over.
        log.restart_at(900);
        assert_eq!(log.after((0, 0)), (vec![], 0));
        log.push(901, 14, line("z"));
        assert_eq!(log.after((0, 0)).0[0].cursor(), (901, 1));
    }

    #[test]
    fn a_member_started_from_a_snapshot_says_earlier_lines_may_be_missing() {
        let mut log = GuestLog::default();
        log.restart_at(0); // a fresh guest: nothing before it
        log.push(1, 10, line("a"));
        assert!(!log.gap_after((1, 1)));
        log.restart_at(40); // caught up from a snapshot of slot 40
        log.push(41, 11, line("b"));
        assert!(
            log.gap_after((1, 1)),
            "slots 2 to 40 wrote lines it never saw"
        );
        assert!(log.gap_after((40, 3)));
        assert!(!log.gap_after((41, 1)));
    }
}
