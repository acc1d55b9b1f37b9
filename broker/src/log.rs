//! The segmented append-only log a broker shard's Raft log is stored in.
//!
//! Records live in segment files named by the index of their first record
//! (`00000000000000000001.seg`). A record is
//!
//! ```text
//! [len: u32 BE][crc32c: u32 BE][index: u64 BE][payload: len bytes]
//! ```
//!
//! where the CRC covers the index and the payload. Indexes are contiguous. Appends go to the
//! last segment and become durable with [`SegmentLog::sync`] (one `fdatasync` for any number of
//! appends: group commit is the caller batching appends before one sync).
//!
//! Opening a log validates every segment. A torn, truncated or corrupted tail of the *last*
//! segment is cut back to the last valid record (the records after it were never acknowledged
//! as durable, or the sync that would have made them so never returned). Damage anywhere else
//! is an error: cutting there would silently drop acknowledged records from the middle.
//!
//! Memory holds, per segment, the offset of each record (4 bytes per record), not payloads.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
#[cfg(unix)]
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes of a record before its payload.
pub const HEADER: usize = 16;
/// Largest payload accepted (a record length beyond it is treated as corruption).
pub const MAX_PAYLOAD: usize = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("i/o on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("corrupt record in {path} at offset {offset} (not the log's tail): {why}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        why: &'static str,
    },
    #[error("append of index {got} where {want} was expected")]
    NotContiguous { got: u64, want: u64 },
    #[error("index {0} is not in the log")]
    Missing(u64),
    #[error("payload of {0} bytes exceeds the record limit")]
    TooLarge(usize),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_owned(),
        source,
    }
}

struct Segment {
    first: u64,
    path: PathBuf,
    /// Byte offset of each record, in index order.
    offsets: Vec<u32>,
    /// Size in bytes of the valid part of the file.
    len: u64,
    /// Opened on the first read and kept: a backlog drains by reading old segments record by
    /// record, and opening the file for each one would cost more than the read.
    reader: Option<File>,
}

impl Segment {
    fn last(&self) -> Option<u64> {
        (!self.offsets.is_empty()).then(|| self.first + self.offsets.len() as u64 - 1)
    }
}

/// What recovery found when the log was opened.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Bytes cut from the last segment's tail.
    pub truncated_bytes: u64,
    /// Records in the log after recovery.
    pub records: u64,
}

pub struct SegmentLog {
    dir: PathBuf,
    segments: Vec<Segment>,
    /// Writer on the last segment.
    writer: Option<BufWriter<File>>,
    segment_bytes: u64,
    /// Index the log starts at when it is empty.
    next_when_empty: u64,
}

fn seg_name(first: u64) -> String {
    format!("{first:020}.seg")
}

impl SegmentLog {
    /// Opens (or creates) the log in `dir`; segments roll over at `segment_bytes`.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<(SegmentLog, Recovery), LogError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut firsts: Vec<u64> = Vec::new();
        for e in fs::read_dir(dir).map_err(io_err(dir))? {
            let e = e.map_err(io_err(dir))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(first) = name
                .strip_suffix(".seg")
                .and_then(|stem| stem.parse::<u64>().ok())
            {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let mut rec = Recovery::default();
        let mut segments = Vec::with_capacity(firsts.len());
        let n = firsts.len();
        for (i, first) in firsts.into_iter().enumerate() {
            let path = dir.join(seg_name(first));
            let is_last = i + 1 == n;
            let seg = scan(&path, first, is_last, &mut rec)?;
            if let Some(prev) = segments.last() {
                let prev: &Segment = prev;
                let want = prev.last().map_or(prev.first, |l| l + 1);
                if seg.first != want {
                    return Err(LogError::Corrupt {
                        path,
                        offset: 0,
                        why: "segment does not continue the previous one",
                    });
                }
            }
            segments.push(seg);
        }
        // An empty last segment (its whole content was torn) is removed, unless it is the only
        // one, which keeps the log's starting index.
        while segments.len() > 1 && segments.last().is_some_and(|s| s.offsets.is_empty()) {
            if let Some(s) = segments.pop() {
                fs::remove_file(&s.path).map_err(io_err(&s.path))?;
            }
        }
        rec.records = segments.iter().map(|s| s.offsets.len() as u64).sum();
        let next_when_empty = segments.first().map_or(1, |s| s.first);
        let mut log = SegmentLog {
            dir: dir.to_owned(),
            segments,
            writer: None,
            segment_bytes: segment_bytes.max(HEADER as u64 + 1),
            next_when_empty,
        };
        log.open_writer()?;
        Ok((log, rec))
    }

    fn open_writer(&mut self) -> Result<(), LogError> {
        self.writer = None;
        if let Some(s) = self.segments.last() {
            let f = OpenOptions::new()
                .append(true)
                .open(&s.path)
                .map_err(io_err(&s.path))?;
            self.writer = Some(BufWriter::with_capacity(256 * 1024, f));
        }
        Ok(())
    }

    /// Index of the first record, if any.
    pub fn first_index(&self) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| !s.offsets.is_empty())
            .map(|s| s.first)
    }

    /// Index of the last record, if any.
    pub fn last_index(&self) -> Option<u64> {
        self.segments.iter().rev().find_map(Segment::last)
    }

    /// The index the next append must carry.
    pub fn next_index(&self) -> u64 {
        self.last_index().map_or(self.next_when_empty, |l| l + 1)
    }

    /// Starts an empty log at `index` (after a snapshot install or a purge of everything).
    pub fn reset(&mut self, index: u64) -> Result<(), LogError> {
        self.writer = None;
        for s in self.segments.drain(..) {
            fs::remove_file(&s.path).map_err(io_err(&s.path))?;
        }
        self.next_when_empty = index;
        Ok(())
    }

    fn roll(&mut self, first: u64) -> Result<(), LogError> {
        // The segment we leave must be durable too: later syncs only touch the new one.
        self.sync()?;
        let path = self.dir.join(seg_name(first));
        File::create(&path).map_err(io_err(&path))?;
        sync_dir(&self.dir)?;
        self.segments.push(Segment {
            first,
            path,
            offsets: Vec::new(),
            len: 0,
            reader: None,
        });
        self.open_writer()
    }

    /// Appends one record with the next index. Not durable until [`SegmentLog::sync`].
    pub fn append(&mut self, index: u64, payload: &[u8]) -> Result<(), LogError> {
        let want = self.next_index();
        if index != want {
            return Err(LogError::NotContiguous { got: index, want });
        }
        if payload.len() > MAX_PAYLOAD {
            return Err(LogError::TooLarge(payload.len()));
        }
        let need_roll = match self.segments.last() {
            None => true,
            Some(s) => {
                !s.offsets.is_empty()
                    && s.len + (HEADER + payload.len()) as u64 > self.segment_bytes
            }
        };
        if need_roll {
            self.roll(index)?;
        }
        let mut crc = crc32c::crc32c(&index.to_be_bytes());
        crc = crc32c::crc32c_append(crc, payload);
        let mut head = [0u8; HEADER];
        head[0..4].copy_from_slice(&(payload.len() as u32).to_be_bytes());
        head[4..8].copy_from_slice(&crc.to_be_bytes());
        head[8..16].copy_from_slice(&index.to_be_bytes());
        let (Some(w), Some(s)) = (self.writer.as_mut(), self.segments.last_mut()) else {
            return Err(LogError::Missing(index));
        };
        w.write_all(&head).map_err(io_err(&s.path))?;
        w.write_all(payload).map_err(io_err(&s.path))?;
        s.offsets.push(s.len as u32);
        s.len += (HEADER + payload.len()) as u64;
        Ok(())
    }

    /// Hands buffered appends to the OS (readable, not yet durable).
    pub fn flush(&mut self) -> Result<(), LogError> {
        if let (Some(w), Some(s)) = (self.writer.as_mut(), self.segments.last()) {
            w.flush().map_err(io_err(&s.path))?;
        }
        Ok(())
    }

    /// Makes every append so far durable: one `fdatasync` however many records it covers.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.flush()?;
        if let (Some(w), Some(s)) = (self.writer.as_mut(), self.segments.last()) {
            w.get_ref().sync_data().map_err(io_err(&s.path))?;
        }
        Ok(())
    }

    /// Hands buffered appends to the OS and returns a handle on the current segment whose
    /// `sync_data` makes them durable. Lets a flusher sync without holding whatever lock
    /// guards the log, so appends go on meanwhile (earlier segments were synced when the log
    /// rolled over).
    pub fn sync_handle(&mut self) -> Result<Option<File>, LogError> {
        self.flush()?;
        match (self.writer.as_ref(), self.segments.last()) {
            (Some(w), Some(s)) => Ok(Some(w.get_ref().try_clone().map_err(io_err(&s.path))?)),
            _ => Ok(None),
        }
    }

    /// Reads the payload of record `index`.
    pub fn read(&mut self, index: u64) -> Result<Vec<u8>, LogError> {
        let at = self
            .segments
            .iter()
            .rposition(|s| s.first <= index && s.last().is_some_and(|l| index <= l))
            .ok_or(LogError::Missing(index))?;
        if at + 1 == self.segments.len() {
            // Only the last segment has appends still in the write buffer.
            self.flush()?;
        }
        let seg = &mut self.segments[at];
        let off = u64::from(seg.offsets[(index - seg.first) as usize]);
        if seg.reader.is_none() {
            seg.reader = Some(File::open(&seg.path).map_err(io_err(&seg.path))?);
        }
        let Some(f) = seg.reader.as_ref() else {
            return Err(LogError::Missing(index));
        };
        let mut head = [0u8; HEADER];
        f.read_exact_at(&mut head, off).map_err(io_err(&seg.path))?;
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let mut payload = vec![0u8; len];
        f.read_exact_at(&mut payload, off + HEADER as u64)
            .map_err(io_err(&seg.path))?;
        Ok(payload)
    }

    /// Removes every record with index >= `from` (Raft: a conflicting suffix).
    pub fn truncate(&mut self, from: u64) -> Result<(), LogError> {
        self.flush()?;
        self.writer = None;
        while let Some(s) = self.segments.last() {
            if s.first >= from && self.segments.len() > 1 {
                let path = s.path.clone();
                self.segments.pop();
                fs::remove_file(&path).map_err(io_err(&path))?;
            } else {
                break;
            }
        }
        if let Some(s) = self.segments.last_mut() {
            if from <= s.first {
                s.offsets.clear();
                s.len = 0;
                self.next_when_empty = s.first;
            } else if let Some(&off) = s.offsets.get((from - s.first) as usize) {
                s.offsets.truncate((from - s.first) as usize);
                s.len = u64::from(off);
            }
            let f = OpenOptions::new()
                .write(true)
                .open(&s.path)
                .map_err(io_err(&s.path))?;
            f.set_len(s.len).map_err(io_err(&s.path))?;
            f.sync_data().map_err(io_err(&s.path))?;
        }
        self.open_writer()
    }

    /// Drops whole segments whose records all have index <= `upto` (compaction after a
    /// snapshot). Records of a segment that straddles `upto` stay.
    pub fn purge(&mut self, upto: u64) -> Result<(), LogError> {
        while self.segments.len() > 1 {
            let s = &self.segments[0];
            if s.last().is_some_and(|l| l <= upto) {
                let path = s.path.clone();
                self.segments.remove(0);
                fs::remove_file(&path).map_err(io_err(&path))?;
            } else {
                break;
            }
        }
        Ok(())
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Validates a segment file. In the last segment, the first bad record and everything after it
/// is cut off; elsewhere it is an error.
fn scan(path: &Path, first: u64, is_last: bool, rec: &mut Recovery) -> Result<Segment, LogError> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(io_err(path))?;
    let mut offsets = Vec::new();
    let mut pos = 0usize;
    let mut expect = first;
    let bad: Option<&'static str> = loop {
        if pos == data.len() {
            break None;
        }
        if data.len() - pos < HEADER {
            break Some("truncated record header");
        }
        let h = &data[pos..pos + HEADER];
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let crc = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let mut ib = [0u8; 8];
        ib.copy_from_slice(&h[8..16]);
        let index = u64::from_be_bytes(ib);
        if len > MAX_PAYLOAD {
            break Some("record length out of range");
        }
        if data.len() - pos - HEADER < len {
            break Some("truncated record payload");
        }
        let payload = &data[pos + HEADER..pos + HEADER + len];
        let got = crc32c::crc32c_append(crc32c::crc32c(&ib), payload);
        if got != crc {
            break Some("checksum mismatch");
        }
        if index != expect {
            break Some("index out of sequence");
        }
        if pos > u32::MAX as usize {
            break Some("segment too large");
        }
        offsets.push(pos as u32);
        pos += HEADER + len;
        expect += 1;
    };
    if let Some(why) = bad {
        if !is_last {
            return Err(LogError::Corrupt {
                path: path.to_owned(),
                offset: pos as u64,
                why,
            });
        }
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        f.set_len(pos as u64).map_err(io_err(path))?;
        f.sync_data().map_err(io_err(path))?;
        rec.truncated_bytes += (data.len() - pos) as u64;
    }
    Ok(Segment {
        first,
        path: path.to_owned(),
        offsets,
        len: pos as u64,
        reader: None,
    })
}
