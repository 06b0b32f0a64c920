//! TensorBoard event files without TensorFlow: TFRecord framing (length, masked CRC-32C of the length, the data,
//! masked CRC-32C of the data) around hand-encoded `Event` protobufs (tensorflow/core/util/event.proto): the
//! first event carries `file_version: "brain.Event:2"`, each scalar is an event with a one-value summary.
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};
use crate::fsutil::create_dir;

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as TFRecord frames use it.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = [0u32; 256];
        for (i, entry) in table.iter_mut().enumerate() {
            let mut crc = i as u32;
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
            }
            *entry = crc;
        }
        table
    });
    !data.iter().fold(!0u32, |crc, &byte| table[((crc ^ byte as u32) & 0xff) as usize] ^ (crc >> 8))
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord frame around `data`.
fn record(data: &[u8]) -> Vec<u8> {
    let length = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&length);
    out.extend_from_slice(&masked_crc(&length).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A length-delimited field (strings, embedded messages).
fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    varint(out, u64::from(field << 3 | 2));
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 | summary = 5 }`.
fn event(wall_time: f64, step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = vec![1 << 3 | 1];
    out.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        varint(&mut out, 2 << 3);
        varint(&mut out, step as u64);
    }
    body(&mut out);
    out
}

/// `Summary { value = 1: Value { tag = 1 (string), simple_value = 2 (float) } }`.
fn scalar_event(wall_time: f64, step: i64, tag: &str, value: f32) -> Vec<u8> {
    let mut value_msg = Vec::new();
    bytes_field(&mut value_msg, 1, tag.as_bytes());
    value_msg.push(2 << 3 | 5);
    value_msg.extend_from_slice(&value.to_le_bytes());
    let mut summary = Vec::new();
    bytes_field(&mut summary, 1, &value_msg);
    event(wall_time, step, |out| bytes_field(out, 5, &summary))
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = if ok { String::from_utf8_lossy(&buf[..end]).into_owned() } else { String::new() };
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// Files opened by this process, for the last part of the name (as TensorFlow's writer numbers them).
static OPENED: AtomicUsize = AtomicUsize::new(0);

/// An event file that grows by whole records: each `add_scalars` is one write, so a crash leaves a file that
/// reads to its last complete step.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `events.out.tfevents.<seconds>.<host>.<pid>.<n>` in `dir` and writes its version record. A run
    /// that resumes passes the first step it logs as `purge_from`: a `SessionLog { status: START }` at that step
    /// makes TensorBoard drop what earlier files logged from there on (the stopped run's steps after its checkpoint).
    pub fn create(dir: &Path, purge_from: Option<usize>) -> Result<Self> {
        create_dir(dir)?;
        let n = OPENED.fetch_add(1, Ordering::Relaxed);
        let wall = now();
        let name = format!("events.out.tfevents.{}.{}.{}.{n}", wall as u64, hostname(), std::process::id());
        let path = dir.join(name);
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut writer = EventWriter { file, path };
        let version = event(wall, 0, |out| bytes_field(out, 3, b"brain.Event:2"));
        writer.write(&record(&version))?;
        if let Some(step) = purge_from {
            // session_log = 7: SessionLog { status = 1: START (1) }
            let restart = event(wall, step as i64, |out| bytes_field(out, 7, &[1 << 3, 1]));
            writer.write(&record(&restart))?;
        }
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event per (tag, value), all at `step`.
    pub fn add_scalars(&mut self, step: usize, scalars: &[(String, f64)]) -> Result<()> {
        let wall = now();
        let bytes: Vec<u8> = scalars
            .iter()
            .flat_map(|(tag, value)| record(&scalar_event(wall, step as i64, tag, *value as f32)))
            .collect();
        self.write(&bytes)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all(bytes).and_then(|()| self.file.flush()).map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_values() {
        // the check value of the CRC catalogue and RFC 3720's 32 zero bytes
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn a_record_frames_its_data() {
        let framed = record(b"abc");
        assert_eq!(&framed[..8], &3u64.to_le_bytes());
        assert_eq!(framed.len(), 8 + 4 + 3 + 4);
        assert_eq!(&framed[12..15], b"abc");
        let masked = u32::from_le_bytes(framed[15..].try_into().unwrap());
        assert_eq!(masked, crc32c(b"abc").rotate_right(15).wrapping_add(0xa282_ead8));
    }

    #[test]
    fn a_scalar_event_encodes_as_protobuf() {
        let bytes = scalar_event(1.5, 300, "train/loss", 0.25);
        let mut expect = vec![0x09];
        expect.extend_from_slice(&1.5f64.to_le_bytes());
        expect.extend_from_slice(&[0x10, 0xac, 0x02, 0x2a, 19, 0x0a, 17, 0x0a, 10]);
        expect.extend_from_slice(b"train/loss");
        expect.push(0x15);
        expect.extend_from_slice(&0.25f32.to_le_bytes());
        assert_eq!(bytes, expect);
        // as the tensorboard package's protobuf classes serialise Event(step=3, session_log=SessionLog(status=START))
        let restart = event(0.0, 3, |out| bytes_field(out, 7, &[1 << 3, 1]));
        assert_eq!(restart[9..], [0x10, 0x03, 0x3a, 0x02, 0x08, 0x01]);
    }
}
