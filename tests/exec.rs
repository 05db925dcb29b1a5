//! `vp-host exec` as a real process: the app author's one-machine loop.

mod common;

use common::{run, scratch_dir, stdout_lines};

#[test]
fn counter_replies_one_line_per_message() {
    let out = run(
        &["exec", "counter"],
        "{\"add\": 5}\n\n\"get\"\n{\"add\": -7}\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout_lines(&out), ["5", "5", "-2"]);
}

#[test]
fn bad_lines_get_error_replies_and_change_nothing() {
    let out = run(
        &["exec", "counter", "--tagged"],
        "{\"add\": 1}\nnot json\n{\"mul\": 2}\n\"get\"\n",
    );
    assert!(out.status.success());
    let lines = stdout_lines(&out);
    assert_eq!(lines[0], r#"{"id":1,"ok":1}"#);
    assert!(
        lines[1].contains(r#""id":2"#) && lines[1].contains("not JSON"),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].contains(r#""id":3"#) && lines[2].contains("cannot decode message"),
        "{}",
        lines[2]
    );
    assert_eq!(lines[3], r#"{"id":4,"ok":1}"#);
}

#[test]
fn hostile_messages_are_contained() {
    let input = "\"spin\"\n{\"alloc\": 1073741824}\n{\"panic\": \"why\"}\n\"trap\"\n{\"add\": 1}\n";
    let out = run(
        &["exec", "stress", "--fuel", "5000000", "--memory-max", "64M"],
        input,
    );
    assert!(out.status.success());
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 5, "{lines:?}");
    assert!(
        lines[0].contains("ran out of fuel (limit 5000000"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains("memory limit of 67108864 bytes"),
        "{}",
        lines[1]
    );
    assert!(lines[2].contains("guest panicked: why"), "{}", lines[2]);
    assert!(lines[3].contains("unreachable"), "{}", lines[3]);
    assert_eq!(lines[4], "1", "state survived all four");
}

#[test]
fn snapshots_are_reproducible_and_resume() {
    let dir = scratch_dir("exec-snapshots");
    let (a, b) = (dir.join("a.snap"), dir.join("b.snap"));
    let input =
        "{\"put\": {\"key\": \"x\", \"value\": 1}}\n{\"put\": {\"key\": \"y\", \"value\": [2]}}\n";
    for path in [&a, &b] {
        let out = run(
            &["exec", "kv", "--snapshot-out", path.to_str().unwrap()],
            input,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (bytes_a, bytes_b) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(bytes_a, bytes_b, "same input, same snapshot bytes");

    let out = run(
        &["exec", "kv", "--snapshot-in", a.to_str().unwrap()],
        "{\"get\": \"y\"}\n{\"delete\": \"x\"}\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout_lines(&out), ["[2]", "1"]);
}

#[test]
fn bad_files_and_arguments_fail_clearly() {
    let dir = scratch_dir("exec-bad-files");
    let garbage = dir.join("garbage.wasm");
    std::fs::write(&garbage, b"this is not a wasm module").unwrap();
    let out = run(&["exec", garbage.to_str().unwrap()], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a WebAssembly module"));

    let snap = dir.join("counter.snap");
    let out = run(
        &["exec", "counter", "--snapshot-out", snap.to_str().unwrap()],
        "{\"add\": 1}\n",
    );
    assert!(out.status.success());
    let mut bytes = std::fs::read(&snap).unwrap();
    let corrupt = dir.join("corrupt.snap");
    bytes[100] ^= 1;
    std::fs::write(&corrupt, &bytes).unwrap();
    let out = run(
        &[
            "exec",
            "counter",
            "--snapshot-in",
            corrupt.to_str().unwrap(),
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("checksum mismatch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let truncated = dir.join("truncated.snap");
    std::fs::write(&truncated, &bytes[..40]).unwrap();
    let out = run(
        &[
            "exec",
            "counter",
            "--snapshot-in",
            truncated.to_str().unwrap(),
        ],
        "",
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("truncated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = run(&["exec", "kv", "--snapshot-in", snap.to_str().unwrap()], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("was taken from module"));

    let out = run(&["exec", "counter", "--memory-max", "12Q"], "");
    assert_eq!(out.status.code(), Some(2), "clap rejects the argument");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown size unit"));

    let out = run(&["exec", "no-such-app"], "");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("no such file: no-such-app (bundled examples: counter")
    );
}

#[test]
fn app_from_a_wasm_file_and_async_calls_by_hand() {
    let dir = scratch_dir("exec-chat");
    let wasm = dir.join("chat.wasm");
    std::fs::write(&wasm, vp_apps::CHAT).unwrap();
    let input = concat!(
        "{\"ask\": {\"room\": \"00000000000000bb\", \"last\": 1}}\n",
        "{\"$reply\": {\"call\": 1, \"ok\": [{\"n\": 1, \"time_ms\": 3, \"from\": \"bo\", \"text\": \"yo\"}]}}\n",
    );
    let out = run(&["exec", wasm.to_str().unwrap(), "--tagged"], input);
    assert!(out.status.success());
    assert_eq!(
        stdout_lines(&out),
        [r#"{"id":1,"ok":[{"from":"bo","n":1,"text":"yo","time_ms":3}]}"#]
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .contains(r#"{"call":{"id":1,"msg":{"history":{"last":1}},"to":"00000000000000bb"}}"#),
        "{stderr}"
    );
}

#[test]
fn timers_are_shown_and_fired_by_hand() {
    // kv arms its expiry timer (id 0) for the earliest key's expiry; exec has
    // no clock, so `$timer` fires it. Line n is stamped 1000 + n.
    let input = concat!(
        "{\"put\": {\"key\": \"a\", \"value\": 1, \"ttl_ms\": 0}}\n",
        "{\"expiring\": null}\n",
        "{\"$timer\": 0}\n",
        "{\"expiring\": null}\n",
        "{\"$timer\": 0}\n",
        "{\"$timer\": \"zero\"}\n",
    );
    let out = run(&["exec", "kv", "--time-ms", "1000", "--tagged"], input);
    assert!(out.status.success());
    assert_eq!(
        stdout_lines(&out),
        [
            r#"{"id":1,"ok":null}"#,
            r#"{"id":2,"ok":1}"#,
            r#"{"id":4,"ok":0}"#,
            r#"{"error":"line 6: $timer needs a timer id (an unsigned integer)","id":6}"#,
        ]
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    // armed once; the firing removed it, so nothing was left to cancel and
    // the second `$timer 0` found no timer and did nothing
    assert!(
        stderr.contains(r#"{"set_timer":{"due_ms":1001,"id":0}}"#),
        "{stderr}"
    );
    assert_eq!(stderr.matches("timer").count(), 1, "{stderr}");
}
