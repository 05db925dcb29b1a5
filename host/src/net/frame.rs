//! Frames on a `/vp/wire/2` stream: a 4-byte big-endian length, then that
//! many bytes of postcard (the serde data model in varints, fields in
//! declaration order, no names; `/vp/wire/1` carried CBOR, whose decoding was
//! 4.5% of all CPU at the commit benchmark's peak). Every frame is bounded by
//! [`FRAME_BYTES_MAX`]; a frame that is too large or does not decode closes
//! the stream.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest frame body accepted or sent, in bytes.
pub const FRAME_BYTES_MAX: usize = 4 * 1024 * 1024 + 64 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {bytes} bytes exceeds the limit of {FRAME_BYTES_MAX}")]
    TooLarge { bytes: usize },
    #[error("frame does not decode: {0}")]
    Malformed(String),
    #[error("cannot encode frame: {0}")]
    Encode(String),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Append one frame carrying `msg` to `out`.
pub fn encode_frame<M: Serialize>(msg: &M, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    if let Err(e) = postcard::to_io(msg, &mut *out) {
        out.truncate(start);
        return Err(FrameError::Encode(e.to_string()));
    }
    let len = out.len() - start - 4;
    if len > FRAME_BYTES_MAX {
        out.truncate(start);
        return Err(FrameError::TooLarge { bytes: len });
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Decode a frame body (without its length prefix).
pub fn decode_frame_body<M: DeserializeOwned>(body: &[u8]) -> Result<M, FrameError> {
    match postcard::take_from_bytes(body) {
        Ok((msg, [])) => Ok(msg),
        Ok((_, rest)) => Err(FrameError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        ))),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

/// Read the next frame; `Ok(None)` at a clean end of stream.
pub async fn read_frame<M: DeserializeOwned>(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> Result<Option<M>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match stream.read(&mut len[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(FrameError::Truncated),
            n => got += n,
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge { bytes: len });
    }
    buf.clear();
    buf.resize(len, 0);
    stream.read_exact(buf).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    decode_frame_body(buf).map(Some)
}

/// Write already-encoded frames and flush.
pub async fn write_frames(
    stream: &mut (impl AsyncWrite + Unpin),
    frames: &[u8],
) -> Result<(), FrameError> {
    stream.write_all(frames).await?;
    stream.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    enum Msg {
        A(u64),
        B(#[serde(with = "serde_bytes")] Vec<u8>),
    }

    #[test]
    fn frames_round_trip_and_end_cleanly() {
        futures::executor::block_on(async {
            let mut bytes = Vec::new();
            encode_frame(&Msg::A(7), &mut bytes).unwrap();
            encode_frame(&Msg::B(vec![1; 1000]), &mut bytes).unwrap();
            let mut cursor = Cursor::new(bytes);
            let mut buf = Vec::new();
            assert_eq!(
                read_frame::<Msg>(&mut cursor, &mut buf).await.unwrap(),
                Some(Msg::A(7))
            );
            assert_eq!(
                read_frame::<Msg>(&mut cursor, &mut buf).await.unwrap(),
                Some(Msg::B(vec![1; 1000]))
            );
            assert_eq!(
                read_frame::<Msg>(&mut cursor, &mut buf).await.unwrap(),
                None
            );
        });
    }

    #[test]
    fn bad_frames_are_errors() {
        futures::executor::block_on(async {
            let mut buf = Vec::new();
            let huge = (FRAME_BYTES_MAX as u32 + 1).to_be_bytes();
            let err = read_frame::<Msg>(&mut Cursor::new(huge.to_vec()), &mut buf)
                .await
                .unwrap_err();
            assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
            let err = read_frame::<Msg>(
                &mut Cursor::new(vec![0, 0, 0, 3, 0xff, 0xff, 0xff]),
                &mut buf,
            )
            .await
            .unwrap_err();
            assert!(matches!(err, FrameError::Malformed(_)), "{err}");
            let err = read_frame::<Msg>(&mut Cursor::new(vec![0, 0, 0, 9, 1]), &mut buf)
                .await
                .unwrap_err();
            assert!(matches!(err, FrameError::Truncated), "{err}");
            let err = read_frame::<Msg>(&mut Cursor::new(vec![0, 0]), &mut buf)
                .await
                .unwrap_err();
            assert!(matches!(err, FrameError::Truncated), "{err}");
            let mut out = Vec::new();
            assert!(matches!(
                encode_frame(&Msg::B(vec![0; FRAME_BYTES_MAX]), &mut out),
                Err(FrameError::TooLarge { .. })
            ));
            assert!(out.is_empty());
        });
    }
}
