//! The segmented log against a model, and its recovery from torn, truncated and corrupted
//! tails.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;

use broker::log::{HEADER, LogError, SegmentLog};
use proptest::prelude::*;

mod common;
use common::TempDir;

fn payload(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|k| (i as usize * 31 + k) as u8).collect()
}

fn segments(dir: &PathBuf) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

#[test]
fn append_read_reopen_across_segments() {
    let d = TempDir::new();
    {
        let (mut log, rec) = SegmentLog::open(&d.0, 1024).unwrap();
        assert_eq!(rec.records, 0);
        for i in 1..=100 {
            log.append(i, &payload(i, 50)).unwrap();
        }
        log.sync().unwrap();
        assert!(
            log.segment_count() > 3,
            "rolled over: {}",
            log.segment_count()
        );
        assert_eq!(log.read(37).unwrap(), payload(37, 50));
    }
    let (mut log, rec) = SegmentLog::open(&d.0, 1024).unwrap();
    assert_eq!(rec.records, 100);
    assert_eq!(rec.truncated_bytes, 0);
    assert_eq!(log.first_index(), Some(1));
    assert_eq!(log.last_index(), Some(100));
    for i in 1..=100 {
        assert_eq!(log.read(i).unwrap(), payload(i, 50));
    }
    assert!(matches!(
        log.append(7, b"x"),
        Err(LogError::NotContiguous { got: 7, want: 101 })
    ));
}

#[test]
fn torn_tail_is_cut_back_to_last_valid_record() {
    let d = TempDir::new();
    {
        let (mut log, _) = SegmentLog::open(&d.0, 1 << 20).unwrap();
        for i in 1..=10 {
            log.append(i, &payload(i, 100)).unwrap();
        }
        log.sync().unwrap();
    }
    let seg = segments(&d.0).pop().unwrap();
    let full = std::fs::metadata(&seg).unwrap().len();
    // Every possible tear inside the last record leaves exactly the first nine.
    let record = (HEADER + 100) as u64;
    for cut in 1..record {
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.set_len(full - cut).unwrap();
        drop(f);
        let (mut log, rec) = SegmentLog::open(&d.0, 1 << 20).unwrap();
        assert_eq!(log.last_index(), Some(9), "cut {cut}");
        assert_eq!(rec.truncated_bytes, record - cut);
        // The log goes on from there.
        log.append(10, &payload(10, 100)).unwrap();
        log.sync().unwrap();
        drop(log);
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), full);
    }
}

#[test]
fn corrupted_tail_is_cut_and_garbage_after_it_too() {
    let d = TempDir::new();
    {
        let (mut log, _) = SegmentLog::open(&d.0, 1 << 20).unwrap();
        for i in 1..=10 {
            log.append(i, &payload(i, 64)).unwrap();
        }
        log.sync().unwrap();
    }
    let seg = segments(&d.0).pop().unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    // Flip a payload byte of record 8, and append garbage after the end.
    let at = 7 * (HEADER + 64) + HEADER + 5;
    bytes[at] ^= 0xff;
    bytes.extend_from_slice(&[0xab; 300]);
    std::fs::write(&seg, &bytes).unwrap();
    let (mut log, rec) = SegmentLog::open(&d.0, 1 << 20).unwrap();
    assert_eq!(log.last_index(), Some(7));
    assert_eq!(rec.records, 7);
    assert_eq!(log.read(7).unwrap(), payload(7, 64));
}

#[test]
fn damage_before_the_tail_is_an_error_not_a_gap() {
    let d = TempDir::new();
    {
        let (mut log, _) = SegmentLog::open(&d.0, 512).unwrap();
        for i in 1..=40 {
            log.append(i, &payload(i, 64)).unwrap();
        }
        log.sync().unwrap();
    }
    let segs = segments(&d.0);
    assert!(segs.len() >= 3);
    let mut bytes = std::fs::read(&segs[0]).unwrap();
    bytes[HEADER + 1] ^= 0x01;
    std::fs::write(&segs[0], &bytes).unwrap();
    match SegmentLog::open(&d.0, 512) {
        Err(LogError::Corrupt { .. }) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a damaged middle segment must not open"),
    }
}

#[test]
fn torn_empty_last_segment_is_removed() {
    let d = TempDir::new();
    {
        let (mut log, _) = SegmentLog::open(&d.0, 256).unwrap();
        for i in 1..=20 {
            log.append(i, &payload(i, 64)).unwrap();
        }
        log.sync().unwrap();
    }
    let last = segments(&d.0).pop().unwrap();
    let mut f = OpenOptions::new().write(true).open(&last).unwrap();
    f.set_len(0).unwrap();
    f.write_all(&[1, 2, 3]).unwrap();
    drop(f);
    let (log, _) = SegmentLog::open(&d.0, 256).unwrap();
    let first_of_last: u64 = last.file_stem().unwrap().to_str().unwrap().parse().unwrap();
    assert_eq!(log.last_index(), Some(first_of_last - 1));
    assert!(!last.exists());
}

#[derive(Debug, Clone)]
enum Op {
    Append(usize),
    Sync,
    Truncate(u8),
    Purge(u8),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..300).prop_map(Op::Append),
        1 => Just(Op::Sync),
        1 => any::<u8>().prop_map(Op::Truncate),
        1 => any::<u8>().prop_map(Op::Purge),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any sequence of appends, truncations, purges and clean reopens keeps exactly what a
    /// simple vector model keeps.
    #[test]
    fn behaves_like_a_vector(ops in proptest::collection::vec(op(), 1..60)) {
        let d = TempDir::new();
        let (mut log, _) = SegmentLog::open(&d.0, 700).unwrap();
        // model: (first index, payloads)
        let mut first = 1u64;
        let mut model: Vec<Vec<u8>> = Vec::new();
        for op in ops {
            match op {
                Op::Append(len) => {
                    let i = first + model.len() as u64;
                    let p = payload(i, len);
                    log.append(i, &p).unwrap();
                    model.push(p);
                }
                Op::Sync => log.sync().unwrap(),
                Op::Truncate(k) => {
                    if !model.is_empty() {
                        let keep = k as usize % (model.len() + 1);
                        log.truncate(first + keep as u64).unwrap();
                        model.truncate(keep);
                    }
                }
                Op::Purge(k) => {
                    if !model.is_empty() {
                        let upto = first + (k as u64 % model.len() as u64);
                        log.purge(upto).unwrap();
                        // Purge removes whole segments only: catch the model up to the log.
                        let new_first = log.first_index().unwrap_or(first + model.len() as u64);
                        prop_assert!(new_first <= upto + 1);
                        let drop = (new_first - first) as usize;
                        model.drain(..drop.min(model.len()));
                        first = new_first;
                    }
                }
                Op::Reopen => {
                    log.sync().unwrap();
                    drop(log);
                    let (l, rec) = SegmentLog::open(&d.0, 700).unwrap();
                    prop_assert_eq!(rec.truncated_bytes, 0);
                    log = l;
                }
            }
            prop_assert_eq!(log.next_index(), first + model.len() as u64);
        }
        for (k, p) in model.iter().enumerate() {
            prop_assert_eq!(&log.read(first + k as u64).unwrap(), p);
        }
    }

    /// Whatever garbage a crash leaves after the synced records, reopening keeps every synced
    /// record and nothing invented.
    #[test]
    fn crash_garbage_never_loses_synced_records(
        n in 1u64..40,
        garbage in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        let d = TempDir::new();
        {
            let (mut log, _) = SegmentLog::open(&d.0, 1 << 20).unwrap();
            for i in 1..=n {
                log.append(i, &payload(i, 30)).unwrap();
            }
            log.sync().unwrap();
        }
        let seg = segments(&d.0).pop().unwrap();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&garbage).unwrap();
        drop(f);
        let (mut log, _) = SegmentLog::open(&d.0, 1 << 20).unwrap();
        let last = log.last_index().unwrap();
        prop_assert!(last >= n);
        for i in 1..=n {
            prop_assert_eq!(log.read(i).unwrap(), payload(i, 30));
        }
    }
}
