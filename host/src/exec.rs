//! `vp-host exec`: run an app on this machine, one JSON message per line.
//!
//! Each input line is a JSON message, sent as a request from the client
//! `exec` with the line number as its id, or a hand-delivered call reply:
//! `{"$reply": {"call": ID, "ok": VALUE}}` / `{"$reply": {"call": ID, "error": "why"}}`,
//! or a timer fired by hand: `{"$timer": ID}` (an exec run has no clock of its
//! own; the timers the app arms and cancels are printed on stderr).
//! Each reply is printed as one JSON line on stdout (`{"error": "..."}` for an
//! error reply); calls and sends the app makes are printed as JSON lines on
//! stderr. Messages are stamped with time `time_ms + line number` and entropy
//! derived from `seed` and the line number, so the same input gives the same
//! replies and a byte-identical snapshot.

use std::io::{BufRead, Write};

use anyhow::{Context, Result, bail};
use serde_json::{Value as Json, json};
use vp_guest_sdk::abi::{self, Address, Effect, Envelope, Input, WireResult};

use crate::sandbox::{Guest, GuestLimits, Sandbox};

/// The client address `exec` sends from.
pub const EXEC_CLIENT: Address = Address::Client(0);
/// Longest input line accepted, in bytes.
pub const LINE_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Options of one run.
#[derive(Clone, Debug)]
pub struct ExecOptions {
    pub limits: GuestLimits,
    pub time_ms: u64,
    pub seed: u64,
    /// Print `{"id": N, "ok": V}` / `{"id": N, "error": E}` instead of bare replies.
    pub tagged: bool,
}

/// What a run did, for the caller's summary.
#[derive(Debug, Default)]
pub struct ExecSummary {
    pub messages: u64,
    pub errors: u64,
}

fn entropy(seed: u64, line: u64) -> u64 {
    let mut z = seed ^ line.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Start the guest: fresh, or from a snapshot file.
pub fn start_guest(
    sandbox: &Sandbox,
    wasm: &[u8],
    snapshot: Option<&std::path::Path>,
    limits: GuestLimits,
) -> Result<Guest> {
    let module = sandbox.load(wasm)?;
    match snapshot {
        None => Ok(Guest::start(sandbox, module, limits)?),
        Some(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot read snapshot {}", path.display()))?;
            Guest::restore_encoded(sandbox, module, bytes, limits)
                .with_context(|| format!("cannot restore snapshot {}", path.display()))
        }
    }
}

/// Turn one input line into an input for the guest.
fn parse_line(line: &str, number: u64) -> Result<Input, String> {
    let value: Json =
        serde_json::from_str(line).map_err(|e| format!("line {number}: not JSON: {e}"))?;
    if let Some(timer) = value.get("$timer") {
        let id = timer.as_u64().ok_or_else(|| {
            format!("line {number}: $timer needs a timer id (an unsigned integer)")
        })?;
        return Ok(Input::Timer(id));
    }
    if let Some(reply) = value.get("$reply") {
        let call = reply
            .get("call")
            .and_then(Json::as_u64)
            .ok_or_else(|| format!("line {number}: $reply needs \"call\": <call id>"))?;
        let result: WireResult = match (reply.get("ok"), reply.get("error")) {
            (Some(ok), None) => Ok(abi::encode(ok)
                .map_err(|e| format!("line {number}: {e}"))?
                .into()),
            (None, Some(err)) => Err(err.as_str().map_or_else(|| err.to_string(), str::to_string)),
            _ => {
                return Err(format!(
                    "line {number}: $reply needs exactly one of \"ok\" or \"error\""
                ));
            }
        };
        return Ok(Input::CallReply(call, result));
    }
    let payload = abi::encode(&value).map_err(|e| format!("line {number}: {e}"))?;
    Ok(Input::Request(EXEC_CLIENT, number, payload.into()))
}

fn result_json(result: &WireResult) -> Result<Json, String> {
    match result {
        Ok(bytes) => abi::decode::<Json>(bytes)
            .map_err(|e| format!("reply is not JSON-representable CBOR: {e}")),
        Err(e) => Err(e.clone()),
    }
}

fn reply_line(id: u64, result: Result<Json, String>, tagged: bool) -> Json {
    match (result, tagged) {
        (Ok(value), false) => value,
        (Err(e), false) => json!({ "error": e }),
        (Ok(value), true) => json!({ "id": id, "ok": value }),
        (Err(e), true) => json!({ "id": id, "error": e }),
    }
}

/// Run every line of `input` through `guest`, writing replies to `out` and
/// effects to `effects_out`.
pub fn run(
    guest: &mut Guest,
    input: impl BufRead,
    mut out: impl Write,
    mut effects_out: impl Write,
    options: &ExecOptions,
) -> Result<ExecSummary> {
    let mut summary = ExecSummary::default();
    let mut input = input;
    let mut buf = Vec::new();
    let mut number = 0u64;
    loop {
        number += 1;
        let Some(len) = read_line_bounded(&mut input, &mut buf, LINE_BYTES_MAX)
            .with_context(|| format!("cannot read input line {number}"))?
        else {
            break;
        };
        if len > LINE_BYTES_MAX {
            summary.messages += 1;
            summary.errors += 1;
            let err = format!("line {number}: {len} bytes; at most {LINE_BYTES_MAX}");
            writeln!(out, "{}", reply_line(number, Err(err), options.tagged))?;
            continue;
        }
        let line = std::str::from_utf8(&buf)
            .map_err(|e| anyhow::anyhow!("input line {number} is not UTF-8: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        summary.messages += 1;
        let input = match parse_line(line, number) {
            Ok(input) => input,
            Err(e) => {
                summary.errors += 1;
                writeln!(out, "{}", reply_line(number, Err(e), options.tagged))?;
                continue;
            }
        };
        let is_request = matches!(input, Input::Request(..));
        let envelope = Envelope(
            options.time_ms.wrapping_add(number),
            entropy(options.seed, number),
            input,
        );
        match guest.handle(&envelope) {
            Err(e) => {
                summary.errors += 1;
                if is_request {
                    writeln!(
                        out,
                        "{}",
                        reply_line(number, Err(e.to_string()), options.tagged)
                    )?;
                } else {
                    writeln!(
                        effects_out,
                        "{}",
                        json!({ "failed": { "line": number, "error": e.to_string() } })
                    )?;
                }
            }
            Ok(effects) => {
                for effect in effects {
                    match effect {
                        Effect::Reply(to, id, result) => {
                            let result = result_json(&result);
                            summary.errors += u64::from(result.is_err());
                            if to == EXEC_CLIENT {
                                writeln!(out, "{}", reply_line(id, result, options.tagged))?;
                            } else {
                                let line = json!({ "reply": { "to": to.to_string(), "id": id, "result": reply_line(id, result, false) } });
                                writeln!(effects_out, "{line}")?;
                            }
                        }
                        Effect::Send(to, id, payload) => {
                            let msg = abi::decode::<Json>(&payload)
                                .unwrap_or_else(|e| json!({ "undecodable": e }));
                            writeln!(
                                effects_out,
                                "{}",
                                json!({ "send": { "id": id, "to": to.to_string(), "msg": msg } })
                            )?;
                        }
                        Effect::Call(to, id, payload) => {
                            let msg = abi::decode::<Json>(&payload)
                                .unwrap_or_else(|e| json!({ "undecodable": e }));
                            writeln!(
                                effects_out,
                                "{}",
                                json!({ "call": { "id": id, "to": to.to_string(), "msg": msg } })
                            )?;
                        }
                        Effect::SetTimer(id, due_ms) => writeln!(
                            effects_out,
                            "{}",
                            json!({ "set_timer": { "id": id, "due_ms": due_ms } })
                        )?,
                        Effect::CancelTimer(id) => {
                            writeln!(effects_out, "{}", json!({ "cancel_timer": { "id": id } }))?
                        }
                    }
                }
            }
        }
        out.flush()?;
    }
    Ok(summary)
}

/// Read the next line of `input` into `buf` (without its `\n` or `\r\n`),
/// keeping at most `max + 1` bytes: a longer line is read to its end but not
/// kept, so a line without end cannot exhaust memory. Returns the line's full
/// length, or `None` at the end of the input.
pub(crate) fn read_line_bounded(
    input: &mut impl BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<usize>> {
    buf.clear();
    let mut len = 0usize;
    let mut any = false;
    loop {
        let chunk = match input.fill_buf() {
            Ok(chunk) => chunk,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            break;
        }
        any = true;
        let newline = chunk.iter().position(|&b| b == b'\n');
        let part = &chunk[..newline.unwrap_or(chunk.len())];
        let room = (max + 1).saturating_sub(buf.len());
        buf.extend_from_slice(&part[..part.len().min(room)]);
        len = len.saturating_add(part.len());
        let used = newline.map_or(chunk.len(), |i| i + 1);
        input.consume(used);
        if newline.is_some() {
            break;
        }
    }
    if !any {
        return Ok(None);
    }
    if buf.last() == Some(&b'\r') && len <= max {
        buf.pop();
        len -= 1;
    }
    Ok(Some(len))
}

/// Set `path`'s modification time to now (the caches and the module store
/// keep their files' last use there). Failing is logged and costs only an
/// earlier eviction.
pub fn mark_used(path: &std::path::Path) {
    let touched = std::fs::File::options()
        .append(true)
        .open(path)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    if let Err(e) = touched {
        tracing::debug!(path = %path.display(), "cannot mark a file used: {e}");
    }
}

/// Write `bytes` to `path` atomically: temp file, fsync, rename, fsync dir.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let Some(name) = path.file_name() else {
        bail!("{} is not a file path", path.display())
    };
    // A name of its own: two writers of the same file at once (two
    // deployments storing one module) must not rename each other's.
    let tmp = dir.join(format!(
        ".{}.{:016x}.tmp",
        name.to_string_lossy(),
        rand::random::<u64>()
    ));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(bytes)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("cannot sync {}", tmp.display()))?;
        drop(file);
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_dir(&dir)
}

/// Make the entries of `dir` (a rename, a removal) durable.
pub fn sync_dir(dir: &std::path::Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::Sandbox;

    /// Found by a test of two spawns at once: both stored the same module
    /// through one temporary name, and the second rename failed.
    #[test]
    fn two_writers_of_one_file_at_once_both_succeed() {
        let dir = std::env::temp_dir().join(format!("vp-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("same.wasm");
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .map(|_| write_atomically(&path, b"the same bytes"))
                        .collect::<Result<Vec<()>>>()
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap().unwrap();
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"the same bytes");
        let left = std::fs::read_dir(&dir).unwrap().count();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(left, 1, "temporary files left behind");
    }

    /// Found while writing the fuzz targets: `exec` read each input line whole
    /// (`BufRead::lines`) before checking `LINE_BYTES_MAX`, so one line without
    /// an end held all of it in memory. Now a line keeps at most the limit.
    #[test]
    fn a_long_line_is_measured_without_being_held() {
        let long = vec![b'a'; 3 * 1024 * 1024];
        let mut stream = Vec::new();
        stream.extend_from_slice(&long);
        stream.extend_from_slice(b"\nnext\r\nlast");
        let mut input = std::io::Cursor::new(stream);
        let mut buf = Vec::new();
        let max = 1024;
        assert_eq!(
            read_line_bounded(&mut input, &mut buf, max).unwrap(),
            Some(long.len())
        );
        assert!(buf.len() <= max + 1, "kept {} bytes", buf.len());
        assert_eq!(
            read_line_bounded(&mut input, &mut buf, max).unwrap(),
            Some(4)
        );
        assert_eq!(buf, b"next");
        assert_eq!(
            read_line_bounded(&mut input, &mut buf, max).unwrap(),
            Some(4)
        );
        assert_eq!(buf, b"last");
        assert_eq!(read_line_bounded(&mut input, &mut buf, max).unwrap(), None);
    }

    #[test]
    fn an_oversized_line_gets_an_error_and_the_next_line_runs() {
        let sandbox = Sandbox::new().unwrap();
        let module = sandbox.load(vp_apps::COUNTER).unwrap();
        let options = ExecOptions {
            limits: GuestLimits::default(),
            time_ms: 0,
            seed: 0,
            tagged: true,
        };
        let mut guest = Guest::start(&sandbox, module, options.limits).unwrap();
        let mut stream = vec![b'x'; LINE_BYTES_MAX + 10];
        stream.extend_from_slice(b"\n{\"add\": 2}\n");
        let mut out = Vec::new();
        let summary = run(
            &mut guest,
            std::io::Cursor::new(stream),
            &mut out,
            std::io::sink(),
            &options,
        )
        .unwrap();
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(lines[0].contains("at most"), "{}", lines[0]);
        assert_eq!(lines[1], r#"{"id":2,"ok":2}"#);
        assert_eq!(summary.messages, 2);
        assert_eq!(summary.errors, 1);
    }
}
