//! Identifiers, keys, node references and key ranges.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Caller time in microseconds. The core never reads a clock: every input carries `now`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Time(pub u64);

impl Time {
    /// Time zero.
    pub const ZERO: Time = Time(0);

    /// `self + micros`, saturating.
    #[must_use]
    pub fn plus_micros(self, micros: u64) -> Time {
        Time(self.0.saturating_add(micros))
    }

    /// Microseconds since `earlier` (0 if `earlier` is later).
    #[must_use]
    pub fn micros_since(self, earlier: Time) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}us", self.0)
    }
}

/// Identity of a host (one `vp-host` process). The daemon derives it from the host's
/// authenticated network identity and must check that `from` matches the sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HostId(pub u64);

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Immutable, cheaply clonable bytes (keys and payloads). Serialised as a CBOR/serde byte
/// string, not as an array of integers.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bytes(Arc<[u8]>);

impl Bytes {
    /// Copy `bytes` into a new value.
    #[must_use]
    pub fn copy_from(bytes: &[u8]) -> Bytes {
        Bytes(Arc::from(bytes))
    }

    /// The bytes.
    #[must_use]
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Bytes {
        Bytes(Arc::from(v))
    }
}

impl From<&[u8]> for Bytes {
    fn from(v: &[u8]) -> Bytes {
        Bytes::copy_from(v)
    }
}

impl From<&str> for Bytes {
    fn from(v: &str) -> Bytes {
        Bytes::copy_from(v.as_bytes())
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_bytes(f, &self.0)
    }
}

fn write_bytes(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    let printable = bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ');
    if printable {
        write!(f, "\"{}\"", String::from_utf8_lossy(bytes))
    } else {
        f.write_str("0x")?;
        for b in bytes {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde_bytes::Bytes::new(&self.0).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let buf = serde_bytes::ByteBuf::deserialize(d)?;
        Ok(Bytes::from(buf.into_vec()))
    }
}

/// A key in the skip graph: ordered bytewise (lexicographically).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Key(pub Bytes);

impl Key {
    /// A key from bytes.
    #[must_use]
    pub fn new(bytes: impl Into<Bytes>) -> Key {
        Key(bytes.into())
    }

    /// The key's bytes.
    #[must_use]
    pub fn as_slice(&self) -> &[u8] {
        self.0.as_slice()
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if the key is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_bytes(f, self.as_slice())
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_bytes(f, self.as_slice())
    }
}

/// A random membership vector: bit `i` (counting from the least significant bit) decides
/// which list the node joins at level `i + 1`. Two nodes are in the same list at level `l`
/// iff their lowest `l` bits agree.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MembershipVector(pub u64);

impl MembershipVector {
    /// The number of low bits on which `self` and `other` agree (64 if equal).
    #[must_use]
    pub fn common_prefix_len(self, other: MembershipVector) -> u32 {
        (self.0 ^ other.0).trailing_zeros()
    }

    /// True if `self` and `other` are in the same list at `level`.
    #[must_use]
    pub fn shares_level(self, other: MembershipVector, level: usize) -> bool {
        self.common_prefix_len(other) as usize >= level
    }
}

impl fmt::Debug for MembershipVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mv:{:016x}", self.0)
    }
}

/// How to reach a host: caller-defined contact information carried with every reference to
/// a remote node (the daemon puts a libp2p peer id and multiaddrs there; the simulator a
/// plain integer). Its encoded size is checked against `Config::contact_bytes_max`.
pub trait Contact:
    Clone + fmt::Debug + PartialEq + Eq + Serialize + for<'de> Deserialize<'de>
{
    /// Size of this contact on the wire, in bytes (an upper bound is fine).
    fn size_bytes(&self) -> usize;
}

impl Contact for u32 {
    fn size_bytes(&self) -> usize {
        4
    }
}

impl Contact for u64 {
    fn size_bytes(&self) -> usize {
        8
    }
}

impl Contact for () {
    fn size_bytes(&self) -> usize {
        0
    }
}

/// Opaque contact bytes (e.g. an encoded peer id plus multiaddrs).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ContactBytes(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl Contact for ContactBytes {
    fn size_bytes(&self) -> usize {
        self.0.len()
    }
}

/// A reference to a node (one key held by one host), as kept in neighbour lists and passed
/// in messages: everything needed to route to it and to reach its host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRef<C> {
    /// The node's key.
    pub key: Key,
    /// The node's membership vector.
    pub mv: MembershipVector,
    /// The host holding the key.
    pub host: HostId,
    /// How to reach that host.
    pub contact: C,
}

/// A host and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRef<C> {
    /// The host.
    pub host: HostId,
    /// How to reach it.
    pub contact: C,
}

/// One side of a neighbour list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Side {
    /// Smaller keys.
    Left,
    /// Larger keys.
    Right,
}

impl Side {
    /// The other side.
    #[must_use]
    pub fn opposite(self) -> Side {
        match self {
            Side::Left => Side::Right,
            Side::Right => Side::Left,
        }
    }

    /// The side on which `other` lies as seen from `me` (`None` if equal).
    #[must_use]
    pub fn of(other: &Key, me: &Key) -> Option<Side> {
        match other.cmp(me) {
            Ordering::Less => Some(Side::Left),
            Ordering::Greater => Some(Side::Right),
            Ordering::Equal => None,
        }
    }

    /// Index 0 for left, 1 for right.
    #[must_use]
    pub fn index(self) -> usize {
        match self {
            Side::Left => 0,
            Side::Right => 1,
        }
    }
}

/// One end of a [`KeyRange`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Bound {
    /// The key itself is in the range.
    Included(Key),
    /// The key itself is not in the range.
    Excluded(Key),
    /// No bound on this side.
    Unbounded,
}

/// A range of keys, `[lo, hi]` with either end open or unbounded. A message to a virtual
/// peer is a multicast over [`KeyRange::prefix`] of its id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRange {
    /// Lower end.
    pub lo: Bound,
    /// Upper end.
    pub hi: Bound,
}

impl KeyRange {
    /// `[lo, hi]`, both ends included.
    #[must_use]
    pub fn inclusive(lo: Key, hi: Key) -> KeyRange {
        KeyRange {
            lo: Bound::Included(lo),
            hi: Bound::Included(hi),
        }
    }

    /// Every key that starts with `prefix`.
    #[must_use]
    pub fn prefix(prefix: &[u8]) -> KeyRange {
        let lo = Bound::Included(Key::new(prefix));
        // The smallest byte string greater than every string with this prefix: drop
        // trailing 0xff bytes and increment the last remaining byte.
        let mut end = prefix.to_vec();
        while end.last() == Some(&0xff) {
            end.pop();
        }
        let hi = match end.last_mut() {
            Some(last) => {
                *last += 1;
                Bound::Excluded(Key::new(end))
            }
            None => Bound::Unbounded,
        };
        KeyRange { lo, hi }
    }

    /// True if `key` is in the range.
    #[must_use]
    pub fn contains(&self, key: &Key) -> bool {
        self.above_lo(key) && self.below_hi(key)
    }

    /// True if `key` is not below the lower end.
    #[must_use]
    pub fn above_lo(&self, key: &Key) -> bool {
        match &self.lo {
            Bound::Included(lo) => key >= lo,
            Bound::Excluded(lo) => key > lo,
            Bound::Unbounded => true,
        }
    }

    /// True if `key` is not above the upper end.
    #[must_use]
    pub fn below_hi(&self, key: &Key) -> bool {
        match &self.hi {
            Bound::Included(hi) => key <= hi,
            Bound::Excluded(hi) => key < hi,
            Bound::Unbounded => true,
        }
    }

    /// True if the range can contain no key at all (lo above hi).
    #[must_use]
    pub fn is_empty_interval(&self) -> bool {
        match (&self.lo, &self.hi) {
            (Bound::Included(lo), Bound::Included(hi)) => lo > hi,
            (Bound::Included(lo) | Bound::Excluded(lo), Bound::Excluded(hi))
            | (Bound::Excluded(lo), Bound::Included(hi)) => lo >= hi,
            _ => false,
        }
    }

    /// Total bytes of keys in the bounds.
    #[must_use]
    pub fn size_bytes(&self) -> usize {
        let b = |b: &Bound| match b {
            Bound::Included(k) | Bound::Excluded(k) => k.len(),
            Bound::Unbounded => 0,
        };
        b(&self.lo) + b(&self.hi)
    }
}

/// Identifies an operation started on a host (search, multicast): the origin host plus a
/// sequence number local to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OpId {
    /// The host that started the operation.
    pub origin: HostId,
    /// Sequence number on that host.
    pub seq: u64,
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.origin, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_range_covers_exactly_the_prefix() {
        let r = KeyRange::prefix(b"vp1/");
        assert!(r.contains(&Key::new(&b"vp1/"[..])));
        assert!(r.contains(&Key::new(&b"vp1/zzz"[..])));
        assert!(r.contains(&Key::new(&b"vp1/\xff\xff"[..])));
        assert!(!r.contains(&Key::new(&b"vp10"[..])));
        assert!(!r.contains(&Key::new(&b"vp1"[..])));
        assert!(!r.contains(&Key::new(&b"vp10/"[..])));
        assert!(!r.contains(&Key::new(&b"vp2/"[..])));
        let all = KeyRange::prefix(b"\xff\xff");
        assert!(all.contains(&Key::new(&b"\xff\xff\x00"[..])));
        assert!(!all.contains(&Key::new(&b"\xff"[..])));
        assert_eq!(all.hi, Bound::Unbounded);
    }

    #[test]
    fn membership_vector_prefix() {
        let a = MembershipVector(0b1011);
        let b = MembershipVector(0b0011);
        assert_eq!(a.common_prefix_len(b), 3);
        assert!(a.shares_level(b, 3));
        assert!(!a.shares_level(b, 4));
        assert_eq!(a.common_prefix_len(a), 64);
    }
}
