//! The guest ABI, version 1: the wire types that cross the sandbox boundary.
//!
//! Both sides use this module (the host depends on this crate), so the host and
//! every guest agree on the encoding by construction. `docs/abi.md` describes the
//! same contract for readers who do not read Rust.
//!
//! Everything here is CBOR (RFC 8949) as produced by `ciborium` from the serde
//! derives below. Structs are tuple structs, so they travel as CBOR arrays
//! (positional, compact); enums are externally tagged (`{"req": [...]}`).

use std::fmt;

use serde::{Deserialize, Serialize};

pub mod codec;

/// The ABI version this crate implements. A guest exports `vp_abi_version`
/// returning it; the host refuses a module whose version it does not support.
pub const ABI_VERSION: u32 = 1;

/// Name of the import module every host function lives in.
pub const IMPORT_MODULE: &str = "vp";

/// `vp_handle` / `vp_query` / `vp_init` status: success, output is the normal payload.
pub const STATUS_OK: u32 = 0;
/// Status: the input did not decode as an envelope; output is UTF-8 error text.
pub const STATUS_BAD_INPUT: u32 = 1;
/// Status: the call was made in a state that does not allow it (e.g. `vp_handle`
/// before `vp_init`); output is UTF-8 error text.
pub const STATUS_BAD_STATE: u32 = 2;

/// `log` import level for a panic message: the host keeps it as the cause of the
/// trap that follows.
pub const LOG_LEVEL_PANIC: u32 = 5;
/// `log` import levels 0..=4: trace, debug, info, warn, error.
pub const LOG_LEVEL_ERROR: u32 = 4;

/// Size of the guest's query scratch arena: every allocation a read makes comes
/// from here and is wiped afterwards, so a read leaves linear memory unchanged.
pub const QUERY_SCRATCH_BYTES: usize = 256 * 1024;

/// Identifier of a virtual peer. Displayed as 16 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VpId(pub u64);

impl fmt::Display for VpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for VpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VpId({self})")
    }
}

impl std::str::FromStr for VpId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "`{s}` is not a virtual peer id (1 to 16 hex digits)"
            ));
        }
        u64::from_str_radix(s, 16)
            .map(VpId)
            .map_err(|e| e.to_string())
    }
}

/// Who sent a request: an outside client session, or another virtual peer.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub enum Address {
    /// A client session (e.g. `vp-host send`), identified by a random session id.
    #[serde(rename = "client")]
    Client(u128),
    /// Another virtual peer.
    #[serde(rename = "vp")]
    Vp(VpId),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Client(id) => write!(f, "client:{id:032x}"),
            Address::Vp(vp) => write!(f, "vp:{vp}"),
        }
    }
}

/// The outcome of a request as it crosses the boundary: CBOR bytes of the
/// app's reply type, or an error message.
pub type WireResult = Result<serde_bytes::ByteBuf, String>;

/// One ordered input to a guest, as `vp_handle` receives it.
///
/// CBOR: `[time_ms, entropy, input]`. `time_ms` and `entropy` are stamped by
/// the leader when the message is ordered, so every replica sees the same.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope(pub u64, pub u64, pub Input);

impl Envelope {
    /// Milliseconds since the Unix epoch, as stamped by the ordering leader.
    pub fn time_ms(&self) -> u64 {
        self.0
    }
    /// 64 bits of randomness, stamped by the ordering leader.
    pub fn entropy(&self) -> u64 {
        self.1
    }
    /// What arrived.
    pub fn input(&self) -> &Input {
        &self.2
    }
}

/// What an envelope carries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Input {
    /// A request: `{"req": [from, id, payload]}`. `id` is the sender's message id
    /// (a client's sequence number, or the calling VP's call id); the reply names it.
    #[serde(rename = "req")]
    Request(Address, u64, serde_bytes::ByteBuf),
    /// The answer to an earlier `Effect::Call` this guest made:
    /// `{"rep": [call_id, result]}`.
    #[serde(rename = "rep")]
    CallReply(u64, WireResult),
    /// A timer this guest set (`Effect::SetTimer`) is due: `{"timer": id}`.
    /// The envelope's time is at or after the due time.
    #[serde(rename = "timer")]
    Timer(u64),
}

/// What the guest asks the host to do, in the order it asked. The output of
/// `vp_handle` is a CBOR array of these.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Effect {
    /// Answer request `id` from `to`: `{"reply": [to, id, result]}`. Usually the
    /// request being handled; for a handler that awaited a call, an earlier one.
    #[serde(rename = "reply")]
    Reply(Address, u64, WireResult),
    /// One-way message to another VP: `{"send": [to, id, payload]}`. Any reply
    /// the receiver makes is dropped.
    #[serde(rename = "send")]
    Send(VpId, u64, serde_bytes::ByteBuf),
    /// Request to another VP whose reply comes back as `Input::CallReply(id, ..)`:
    /// `{"call": [to, id, payload]}`.
    #[serde(rename = "call")]
    Call(VpId, u64, serde_bytes::ByteBuf),
    /// Arm timer `id` to fire at `due_ms` (ms since the Unix epoch, on the
    /// ordered clock): `{"set_timer": [id, due_ms]}`. Arming an armed id moves
    /// it. At most [`TIMERS_MAX`] are armed at once.
    #[serde(rename = "set_timer")]
    SetTimer(u64, u64),
    /// Disarm timer `id` (nothing if it is not armed): `{"cancel_timer": id}`.
    #[serde(rename = "cancel_timer")]
    CancelTimer(u64),
}

/// Timers a guest may have armed at once (the SDK refuses more; the host
/// ignores a `set_timer` beyond it with a warning).
pub const TIMERS_MAX: usize = 1024;

/// Encode a value as CBOR into `out` (cleared first).
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), String> {
    out.clear();
    ciborium::into_writer(value, &mut *out).map_err(|e| format!("cannot encode: {e}"))
}

/// Encode a value as CBOR.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    encode_into(value, &mut out)?;
    Ok(out)
}

/// Decode a CBOR value, rejecting trailing bytes.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut reader = bytes;
    let value = ciborium::from_reader(&mut reader).map_err(|e| describe_decode_error(&e))?;
    if !reader.is_empty() {
        return Err(format!(
            "{} trailing bytes after the CBOR value",
            reader.len()
        ));
    }
    Ok(value)
}

fn describe_decode_error<E: fmt::Debug>(e: &ciborium::de::Error<E>) -> String {
    match e {
        ciborium::de::Error::Io(_) => "truncated CBOR".to_string(),
        ciborium::de::Error::Syntax(at) => format!("malformed CBOR at byte {at}"),
        ciborium::de::Error::Semantic(_, msg) => msg.clone(),
        ciborium::de::Error::RecursionLimitExceeded => "CBOR nested too deeply".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_and_is_compact() {
        let env = Envelope(
            1_700_000_000_000,
            42,
            Input::Request(
                Address::Client(7),
                3,
                serde_bytes::ByteBuf::from(vec![0xf6]),
            ),
        );
        let bytes = encode(&env).unwrap();
        assert_eq!(decode::<Envelope>(&bytes).unwrap(), env);
        // positional arrays: no field names on the wire
        assert!(bytes.len() < 40, "envelope is {} bytes", bytes.len());
    }

    #[test]
    fn decode_rejects_trailing_and_truncated_bytes() {
        let mut bytes = encode(&Effect::Send(VpId(1), 2, vec![1, 2].into())).unwrap();
        assert!(decode::<Effect>(&bytes[..bytes.len() - 1]).is_err());
        bytes.push(0);
        let err = decode::<Effect>(&bytes).unwrap_err();
        assert!(err.contains("trailing"), "{err}");
    }

    #[test]
    fn vp_id_parses_and_displays() {
        let id: VpId = "00000000000000ff".parse().unwrap();
        assert_eq!(id, VpId(255));
        assert_eq!(id.to_string(), "00000000000000ff");
        assert!("xyz".parse::<VpId>().is_err());
        assert!("".parse::<VpId>().is_err());
        assert!("11112222333344445".parse::<VpId>().is_err());
    }
}
