//! openraft's storage conformance suite against our durable log store, plus what the suite
//! does not check: append callbacks complete (durability is reported), and the log survives a
//! reopen.

use broker::raft::{C, Command, LogStore, StateMachine};
use openraft::StorageError;
use openraft::entry::RaftEntry;

mod common;
use common::TempDir;
use openraft::storage::{RaftLogReader, RaftLogStorage, RaftLogStorageExt};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::alias::{EntryOf, LogIdOf};

struct Builder;

impl StoreBuilder<C, LogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<C>> {
        let d = TempDir::new();
        // Small segments so the suite's purges and truncations cross segment boundaries.
        let store = LogStore::open(&d.0, 4096).expect("open store");
        Ok((d, store, StateMachine::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_conformance_suite() {
    Suite::test_all(Builder).await.expect("suite");
}

/// The store as a shard node runs it: snapshots in a file beside the log, and the state
/// machine's retention bound wired into the log's purge.
struct FileSnapshots;

impl StoreBuilder<C, LogStore, StateMachine, TempDir> for FileSnapshots {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<C>> {
        let d = TempDir::new();
        let store = LogStore::open(&d.0, 4096).expect("open store");
        let sm = StateMachine::open(&d.0, None, store.retention()).expect("open state machine");
        Ok((d, store, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_conformance_suite_with_file_snapshots() {
    Suite::test_all(FileSnapshots).await.expect("suite");
}

fn entry(term: u64, index: u64, body: &[u8]) -> EntryOf<C> {
    let log_id = LogIdOf::<C>::new(
        openraft::vote::leader_id_adv::LeaderId { term, node_id: 1 },
        index,
    );
    EntryOf::<C>::new_normal(log_id, Command(body.to_vec()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_complete_their_callbacks_and_survive_reopen() {
    let d = TempDir::new();
    {
        let mut store = LogStore::open(&d.0, 1 << 20).unwrap();
        // blocking_append fails if the callback is dropped without being completed.
        for i in 1..=50u64 {
            store
                .blocking_append([entry(1, i, format!("m{i}").as_bytes())])
                .await
                .expect("append acknowledged as durable");
        }
        store
            .blocking_append((51..=100u64).map(|i| entry(2, i, b"batch")))
            .await
            .expect("batch append");
    }
    let mut store = LogStore::open(&d.0, 1 << 20).unwrap();
    let state = store.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id.map(|l| l.index), Some(100));
    let mut reader = store.get_log_reader().await;
    let got = reader.try_get_log_entries(49..52).await.unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(got[0], entry(1, 49, b"m49"));
    assert_eq!(got[2], entry(2, 51, b"batch"));
}
