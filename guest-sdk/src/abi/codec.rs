//! A hand-written CBOR codec for the ABI's fixed frames: the envelope, the
//! effects, and wire results. It produces exactly the bytes the serde derives
//! in the parent module define (the tests compare the two), several times
//! faster than the generic path: every message crosses the boundary twice.
//!
//! The decoder accepts definite lengths only and any integer width; it bounds
//! every length by the bytes actually present, so hostile input cannot make it
//! allocate more than the input's size.

use super::{Address, Effect, Envelope, Input, VpId, WireResult};

const UINT: u8 = 0;
const BYTES: u8 = 2;
const TEXT: u8 = 3;
const ARRAY: u8 = 4;
const MAP: u8 = 5;
const TAG: u8 = 6;
const TAG_BIGNUM: u64 = 2;

fn head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    if n < 24 {
        out.push(m | n as u8);
    } else if n <= u64::from(u8::MAX) {
        out.extend_from_slice(&[m | 24, n as u8]);
    } else if n <= u64::from(u16::MAX) {
        out.push(m | 25);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else if n <= u64::from(u32::MAX) {
        out.push(m | 26);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    head(out, BYTES, b.len() as u64);
    out.extend_from_slice(b);
}

fn text(out: &mut Vec<u8>, s: &str) {
    head(out, TEXT, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// `{"name": ` : a one-entry map opening an externally tagged enum variant.
fn variant(out: &mut Vec<u8>, name: &str) {
    head(out, MAP, 1);
    text(out, name);
}

fn u128_value(out: &mut Vec<u8>, v: u128) {
    match u64::try_from(v) {
        Ok(small) => head(out, UINT, small),
        Err(_) => {
            let be = v.to_be_bytes();
            let first = be.iter().position(|&b| b != 0).unwrap_or(be.len());
            head(out, TAG, TAG_BIGNUM);
            bytes(out, &be[first..]);
        }
    }
}

fn address(out: &mut Vec<u8>, a: &Address) {
    match a {
        Address::Client(id) => {
            variant(out, "client");
            u128_value(out, *id);
        }
        Address::Vp(vp) => {
            variant(out, "vp");
            head(out, UINT, vp.0);
        }
    }
}

fn result(out: &mut Vec<u8>, r: &WireResult) {
    match r {
        Ok(b) => {
            variant(out, "Ok");
            bytes(out, b);
        }
        Err(e) => {
            variant(out, "Err");
            text(out, e);
        }
    }
}

/// Append the CBOR of an envelope.
pub fn encode_envelope(env: &Envelope, out: &mut Vec<u8>) {
    head(out, ARRAY, 3);
    head(out, UINT, env.0);
    head(out, UINT, env.1);
    match &env.2 {
        Input::Request(from, id, payload) => {
            variant(out, "req");
            head(out, ARRAY, 3);
            address(out, from);
            head(out, UINT, *id);
            bytes(out, payload);
        }
        Input::CallReply(call, r) => {
            variant(out, "rep");
            head(out, ARRAY, 2);
            head(out, UINT, *call);
            result(out, r);
        }
        Input::Timer(id) => {
            variant(out, "timer");
            head(out, UINT, *id);
        }
    }
}

/// Append the CBOR of one effect.
pub fn encode_effect(effect: &Effect, out: &mut Vec<u8>) {
    match effect {
        Effect::Reply(to, id, r) => {
            variant(out, "reply");
            head(out, ARRAY, 3);
            address(out, to);
            head(out, UINT, *id);
            result(out, r);
        }
        Effect::Send(to, id, payload) | Effect::Call(to, id, payload) => {
            variant(
                out,
                if matches!(effect, Effect::Send(..)) {
                    "send"
                } else {
                    "call"
                },
            );
            head(out, ARRAY, 3);
            head(out, UINT, to.0);
            head(out, UINT, *id);
            bytes(out, payload);
        }
        Effect::SetTimer(id, due_ms) => {
            variant(out, "set_timer");
            head(out, ARRAY, 2);
            head(out, UINT, *id);
            head(out, UINT, *due_ms);
        }
        Effect::CancelTimer(id) => {
            variant(out, "cancel_timer");
            head(out, UINT, *id);
        }
    }
}

/// Append the CBOR of a list of effects.
pub fn encode_effects(effects: &[Effect], out: &mut Vec<u8>) {
    head(out, ARRAY, effects.len() as u64);
    for e in effects {
        encode_effect(e, out);
    }
}

/// Append the CBOR of a wire result.
pub fn encode_result(r: &WireResult, out: &mut Vec<u8>) {
    result(out, r);
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

type Decoded<T> = Result<T, String>;

impl<'a> Reader<'a> {
    fn err<T>(&self, what: &str) -> Decoded<T> {
        Err(format!("{what} at byte {}", self.at))
    }

    fn head(&mut self) -> Decoded<(u8, u64)> {
        let Some(&first) = self.buf.get(self.at) else {
            return self.err("truncated CBOR");
        };
        let (major, info) = (first >> 5, first & 0x1f);
        let width = match info {
            0..=23 => {
                self.at += 1;
                return Ok((major, u64::from(info)));
            }
            24 => 1,
            25 => 2,
            26 => 4,
            27 => 8,
            _ => return self.err("indefinite or reserved CBOR length"),
        };
        let Some(raw) = self.buf.get(self.at + 1..self.at + 1 + width) else {
            return self.err("truncated CBOR");
        };
        self.at += 1 + width;
        Ok((
            major,
            raw.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
        ))
    }

    fn expect(&mut self, major: u8, what: &str) -> Decoded<u64> {
        let start = self.at;
        let (m, n) = self.head()?;
        if m != major {
            self.at = start;
            return self.err(&format!("expected {what}"));
        }
        Ok(n)
    }

    fn uint(&mut self) -> Decoded<u64> {
        self.expect(UINT, "an unsigned integer")
    }

    fn array(&mut self, len: u64) -> Decoded<()> {
        match self.expect(ARRAY, "an array")? {
            n if n == len => Ok(()),
            n => self.err(&format!("expected an array of {len}, found {n}")),
        }
    }

    fn slice(&mut self, major: u8, what: &str) -> Decoded<&'a [u8]> {
        let len = self.expect(major, what)?;
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| self.at.checked_add(len));
        match end.and_then(|end| self.buf.get(self.at..end).map(|s| (s, end))) {
            Some((s, end)) => {
                self.at = end;
                Ok(s)
            }
            None => self.err("truncated CBOR"),
        }
    }

    fn bytes(&mut self) -> Decoded<&'a [u8]> {
        self.slice(BYTES, "a byte string")
    }

    fn text(&mut self) -> Decoded<&'a str> {
        let raw = self.slice(TEXT, "a text string")?;
        std::str::from_utf8(raw).or_else(|_| self.err("invalid UTF-8"))
    }

    /// The name of a one-entry map (an enum variant).
    fn variant(&mut self) -> Decoded<&'a str> {
        match self.expect(MAP, "an enum variant (a one-entry map)")? {
            1 => self.text(),
            n => self.err(&format!("expected a one-entry map, found {n} entries")),
        }
    }

    fn u128_value(&mut self) -> Decoded<u128> {
        let start = self.at;
        match self.head()? {
            (UINT, n) => Ok(u128::from(n)),
            (TAG, TAG_BIGNUM) => {
                let raw = self.bytes()?;
                if raw.len() > 16 {
                    return self.err("bignum wider than 128 bits");
                }
                Ok(raw.iter().fold(0u128, |acc, &b| (acc << 8) | u128::from(b)))
            }
            _ => {
                self.at = start;
                self.err("expected a 128-bit unsigned integer")
            }
        }
    }

    fn address(&mut self) -> Decoded<Address> {
        match self.variant()? {
            "client" => Ok(Address::Client(self.u128_value()?)),
            "vp" => Ok(Address::Vp(VpId(self.uint()?))),
            other => self.err(&format!("unknown address kind `{other}`")),
        }
    }

    fn result(&mut self) -> Decoded<WireResult> {
        match self.variant()? {
            "Ok" => Ok(Ok(self.bytes()?.to_vec().into())),
            "Err" => Ok(Err(self.text()?.to_string())),
            other => self.err(&format!("unknown result `{other}`")),
        }
    }

    fn envelope(&mut self) -> Decoded<Envelope> {
        self.array(3)?;
        let time_ms = self.uint()?;
        let entropy = self.uint()?;
        let input = match self.variant()? {
            "req" => {
                self.array(3)?;
                let from = self.address()?;
                let id = self.uint()?;
                Input::Request(from, id, self.bytes()?.to_vec().into())
            }
            "rep" => {
                self.array(2)?;
                let call = self.uint()?;
                Input::CallReply(call, self.result()?)
            }
            "timer" => Input::Timer(self.uint()?),
            other => return self.err(&format!("unknown input kind `{other}`")),
        };
        Ok(Envelope(time_ms, entropy, input))
    }

    fn effect(&mut self) -> Decoded<Effect> {
        let kind = self.variant()?;
        match kind {
            "set_timer" => {
                self.array(2)?;
                let id = self.uint()?;
                return Ok(Effect::SetTimer(id, self.uint()?));
            }
            "cancel_timer" => return Ok(Effect::CancelTimer(self.uint()?)),
            _ => self.array(3)?,
        }
        match kind {
            "reply" => {
                let to = self.address()?;
                let id = self.uint()?;
                Ok(Effect::Reply(to, id, self.result()?))
            }
            "send" | "call" => {
                let to = VpId(self.uint()?);
                let id = self.uint()?;
                let payload = self.bytes()?.to_vec().into();
                Ok(if kind == "send" {
                    Effect::Send(to, id, payload)
                } else {
                    Effect::Call(to, id, payload)
                })
            }
            other => self.err(&format!("unknown effect `{other}`")),
        }
    }

    fn finish<T>(&self, value: T) -> Decoded<T> {
        if self.at != self.buf.len() {
            return Err(format!(
                "{} trailing bytes after the CBOR value",
                self.buf.len() - self.at
            ));
        }
        Ok(value)
    }
}

/// Decode an envelope.
pub fn decode_envelope(buf: &[u8]) -> Decoded<Envelope> {
    let mut r = Reader { buf, at: 0 };
    let env = r.envelope()?;
    r.finish(env)
}

/// Decode a list of effects.
pub fn decode_effects(buf: &[u8]) -> Decoded<Vec<Effect>> {
    let mut r = Reader { buf, at: 0 };
    let n = r.expect(ARRAY, "an array of effects")?;
    // Each effect takes at least 4 bytes: never reserve more than the input allows.
    let mut effects = Vec::with_capacity((n as usize).min(buf.len() / 4));
    for _ in 0..n {
        effects.push(r.effect()?);
    }
    r.finish(effects)
}

/// Decode a wire result.
pub fn decode_result(buf: &[u8]) -> Decoded<WireResult> {
    let mut r = Reader { buf, at: 0 };
    let result = r.result()?;
    r.finish(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{decode, encode};

    fn envelopes() -> Vec<Envelope> {
        let payloads: [&[u8]; 3] = [b"", b"\xa1\x63add\x05", &[7u8; 300]];
        let mut out = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            let n = [
                0u64,
                23,
                24,
                255,
                256,
                65535,
                65536,
                u32::MAX as u64,
                u64::MAX,
            ][i * 3 % 9];
            for from in [
                Address::Client(0),
                Address::Client(u128::MAX),
                Address::Client(1 << 64),
                Address::Vp(VpId(n)),
            ] {
                out.push(Envelope(
                    n,
                    u64::MAX - n,
                    Input::Request(from, n / 2, p.to_vec().into()),
                ));
            }
            out.push(Envelope(n, n, Input::CallReply(n, Ok(p.to_vec().into()))));
            out.push(Envelope(n, n, Input::CallReply(n, Err("é".repeat(i * 20)))));
            out.push(Envelope(n, n / 3, Input::Timer(n)));
        }
        out
    }

    fn effects() -> Vec<Effect> {
        vec![
            Effect::Reply(Address::Client(1 << 100), 3, Ok(vec![1, 2, 3].into())),
            Effect::Reply(Address::Vp(VpId(9)), u64::MAX, Err("no".into())),
            Effect::Send(VpId(u64::MAX), 1, vec![0; 70_000].into()),
            Effect::Call(VpId(0), 24, vec![].into()),
            Effect::SetTimer(0, u64::MAX),
            Effect::SetTimer(65536, 1_700_000_000_000),
            Effect::CancelTimer(24),
        ]
    }

    #[test]
    fn same_bytes_as_the_serde_definition() {
        for env in envelopes() {
            let mut fast = Vec::new();
            encode_envelope(&env, &mut fast);
            assert_eq!(fast, encode(&env).unwrap(), "{env:?}");
            assert_eq!(decode_envelope(&fast).unwrap(), env);
            assert_eq!(decode::<Envelope>(&fast).unwrap(), env);
        }
        let effects = effects();
        let mut fast = Vec::new();
        encode_effects(&effects, &mut fast);
        assert_eq!(fast, encode(&effects).unwrap());
        assert_eq!(decode_effects(&fast).unwrap(), effects);
        for r in [Ok(vec![9u8].into()), Err("x".to_string())] {
            let mut fast = Vec::new();
            encode_result(&r, &mut fast);
            assert_eq!(fast, encode(&r).unwrap());
            assert_eq!(decode_result(&fast).unwrap(), r);
        }
    }

    #[test]
    fn hostile_input_is_refused_not_trusted() {
        let mut good = Vec::new();
        encode_effects(&effects(), &mut good);
        for cut in 0..good.len().min(200) {
            assert!(decode_effects(&good[..cut]).is_err(), "truncated at {cut}");
        }
        // a huge declared count with nothing behind it allocates nothing big
        assert!(decode_effects(&[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err());
        // a huge declared byte-string length
        assert!(
            decode_result(&[
                0xa1, 0x62, b'O', b'k', 0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff
            ])
            .is_err()
        );
        // indefinite lengths are refused
        assert!(decode_effects(&[0x9f, 0xff]).is_err());
        // trailing bytes
        let mut env = Vec::new();
        encode_envelope(&envelopes()[0], &mut env);
        env.push(0);
        assert!(decode_envelope(&env).unwrap_err().contains("trailing"));
        // unknown variants and invalid UTF-8
        assert!(
            decode_result(&[0xa1, 0x62, b'N', b'o', 0x40])
                .unwrap_err()
                .contains("unknown result")
        );
        assert!(
            decode_result(&[0xa1, 0x63, b'E', b'r', b'r', 0x61, 0xff])
                .unwrap_err()
                .contains("UTF-8")
        );
    }
}
