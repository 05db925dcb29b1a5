//! Tunables and limits of a skip-graph host.

use serde::{Deserialize, Serialize};

/// Configuration of an [`crate::AlmHost`]: every limit is named `*_max`, every duration is
/// in microseconds of caller time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Number of levels (level 0 holds every key). At most 64 (bits of a membership vector).
    pub level_max: usize,
    /// Keys one host may hold at once.
    pub keys_per_host_max: usize,
    /// Longest key.
    pub key_bytes_max: usize,
    /// Largest multicast payload.
    pub payload_bytes_max: usize,
    /// Largest encoded contact information of a host.
    pub contact_bytes_max: usize,
    /// Searches and joins this host may have started and not finished.
    pub ops_in_flight_max: usize,
    /// Multicast hand-offs awaiting an acknowledgement (or parked for a retry).
    pub forwards_in_flight_max: usize,
    /// Hops a routed message (search, multicast, walk) may take before it is dropped.
    pub hops_max: u32,
    /// Redirects one link request may follow.
    pub redirects_max: u32,
    /// Attempts for one request (link, search, multicast hand-off) before giving up on it.
    pub attempts_max: u32,
    /// Multicast deliveries remembered to suppress duplicates.
    pub dedup_entries_max: usize,
    /// How long a multicast delivery is remembered.
    pub dedup_ttl_us: u64,
    /// Messages queued for `poll_send` before new ones are refused.
    pub sends_queued_max: usize,
    /// Events queued for `poll_event` before new ones are dropped (and counted).
    pub events_queued_max: usize,
    /// Hosts tracked by the failure detector.
    pub peers_max: usize,
    /// Time to wait for a reply to one link request, walk, search attempt or hand-off.
    pub request_timeout_us: u64,
    /// Delay before retrying something that waits for a repair.
    pub retry_delay_us: u64,
    /// A neighbour host not heard from for this long is pinged.
    pub ping_interval_us: u64,
    /// Time to wait for a pong.
    pub ping_timeout_us: u64,
    /// Unanswered pings (in a row) after which a host is declared dead.
    pub ping_attempts_max: u32,
    /// Every node re-checks its right neighbour at every level this often (0: never).
    pub stabilize_interval_us: u64,
    /// How long a host declared dead is remembered (ignored as a neighbour) unless it speaks.
    pub dead_memory_us: u64,
    /// Emit `Event::NeighbourChanged` on every link change.
    pub neighbour_events: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            level_max: 48,
            keys_per_host_max: 4096,
            key_bytes_max: 256,
            payload_bytes_max: 256 * 1024,
            contact_bytes_max: 1024,
            ops_in_flight_max: 4096,
            forwards_in_flight_max: 16384,
            hops_max: 256,
            redirects_max: 64,
            attempts_max: 3,
            dedup_entries_max: 65536,
            dedup_ttl_us: 120_000_000,
            sends_queued_max: 1 << 20,
            events_queued_max: 1 << 16,
            peers_max: 65536,
            request_timeout_us: 1_000_000,
            retry_delay_us: 250_000,
            ping_interval_us: 2_000_000,
            ping_timeout_us: 500_000,
            ping_attempts_max: 3,
            stabilize_interval_us: 30_000_000,
            dead_memory_us: 60_000_000,
            neighbour_events: false,
        }
    }
}
