//! The embedded store's journal: every tenant's keys in one redb file
//! (`DIR/kv.redb`) and a write-ahead log (`DIR/kv.wal`, [`super::wal`]),
//! written by one committer thread.
//!
//! Writes are numbered and collected (latest value per key) while the
//! committer is busy; each commit takes everything collected so far and
//! appends it to the log with one fdatasync. So concurrent calls share a
//! commit, and a hot counter written a thousand times between two commits
//! costs one record. Every 16 MiB of log or 10 s the committer moves what
//! the log holds into redb (one transaction) and empties the log; at open,
//! a log left by a crash is replayed into redb first. A call that wrote waits (without holding a worker) for the commit
//! covering its number; in `relaxed` mode nothing waits and the committer
//! commits at most every `flush_ms`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::wal::{Wal, WalError};
use super::{KvError, KvMetrics, Ticket};
use crate::sync::lock;

const KV: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The layout this build writes; a file with another is refused.
const FORMAT: u64 = 1;
const FILE: &str = "kv.redb";
const LOG: &str = "kv.wal";
/// The log is moved into redb when it is this long, or this old.
const CHECKPOINT_BYTES: u64 = 16 << 20;
const CHECKPOINT_EVERY: Duration = Duration::from_secs(10);
/// How long a call waits for its commit before its reply says the store
/// is unavailable.
const COMMIT_WAIT: Duration = Duration::from_secs(5);
/// A failing commit is retried after this, doubling up to `MAX_RETRY`.
const MIN_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(5);
/// A failing store is logged at most once per this.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// In sync mode, writes no call waits for (a datagram without a reply, an
/// event, a task) are committed at most this late: they gather meanwhile.
const UNWAITED: Duration = Duration::from_millis(10);
/// After a call waited for a commit, commits start at the first write for
/// this long.
const EAGER_FOR: Duration = Duration::from_millis(100);

/// When a write counts as done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// On disk before the reply of the call that made it leaves.
    Sync,
    /// Committed at most this long after it was made; a crash loses at most
    /// this window (plus the commit in flight).
    Relaxed(Duration),
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("kv: cannot create the data directory {path}: {source} (set [kv] dir to a directory evrhost may write)")]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("kv: {path} is held by another evrhost (one daemon per data directory; set [kv] dir)")]
    InUse { path: PathBuf },
    #[error(
        "kv: cannot open {path}: {reason} (restore it from a backup, or move it away to start with an empty store)"
    )]
    Open { path: PathBuf, reason: String },
    #[error("kv: {path} has layout {found}, this evrhost reads {FORMAT} (it was written by another version)")]
    Format { path: PathBuf, found: u64 },
    #[error("kv: cannot start the committer thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Wal(#[from] WalError),
}

/// Writes collected for the next commit: tenant → key → value (None: deleted).
pub(crate) type Batch = HashMap<String, HashMap<String, Option<Vec<u8>>>>;

#[derive(Default)]
struct Pending {
    batch: Batch,
    writes: usize,
    /// The last number given out.
    last: u64,
    /// When the oldest write in `batch` was made.
    since: Option<Instant>,
    /// Calls waiting for a commit: while there are none, writes gather.
    waiters: usize,
    /// Until then commits start at the first write, as calls have lately
    /// waited for them (the commit then overlaps the rest of the call).
    eager_until: Option<Instant>,
    closing: bool,
}

/// How far commits got, as calls wait on it.
#[derive(Clone, Debug, Default)]
struct Progress {
    durable: u64,
    /// Numbers up to this were in a commit that failed (and is retried).
    failed_upto: u64,
    error: Option<Arc<str>>,
}

struct Shared {
    path: PathBuf,
    durability: Durability,
    pending: Mutex<Pending>,
    wake: Condvar,
    progress: tokio::sync::watch::Sender<Progress>,
    commits: AtomicU64,
    committed_writes: AtomicU64,
    errors: AtomicU64,
}

pub struct Journal {
    shared: Arc<Shared>,
    /// Receives once when the committer has ended.
    done: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

/// What `open` read back, by tenant.
pub type Loaded = HashMap<String, Vec<(String, Vec<u8>)>>;

impl Journal {
    /// Opens (or creates) `dir/kv.redb` and reads every key back.
    pub fn open(dir: &Path, durability: Durability) -> Result<(Journal, Loaded), JournalError> {
        create_private_dir(dir).map_err(|source| JournalError::Dir { path: dir.to_path_buf(), source })?;
        let path = dir.join(FILE);
        let db = redb::Database::create(&path).map_err(|e| open_error(&path, e))?;
        let mut loaded = check_and_read(&db, &path)?;
        let (mut wal, records) = Wal::open(&dir.join(LOG))?;
        if !records.is_empty() {
            // What a crash left in the log goes into redb before anything
            // else, in the order it was written.
            let mut replay = Batch::new();
            for (tenant, key, value) in records {
                replay.entry(tenant).or_default().insert(key, value);
            }
            let fail = |e: &dyn std::fmt::Display| JournalError::Open { path: path.clone(), reason: e.to_string() };
            commit(&db, &replay).map_err(|e| fail(&e))?;
            wal.reset().map_err(|e| fail(&e))?;
            loaded = check_and_read(&db, &path)?;
        }
        let shared = Arc::new(Shared {
            path: path.clone(),
            durability,
            pending: Mutex::default(),
            wake: Condvar::new(),
            progress: tokio::sync::watch::Sender::new(Progress::default()),
            commits: AtomicU64::new(0),
            committed_writes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        });
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let worker = shared.clone();
        std::thread::Builder::new()
            .name("evrhost-kv-commit".into())
            .spawn(move || {
                let store = Store { db: Some(db), wal, unchecked: Batch::new(), checkpointed: Instant::now() };
                committer(&worker, store);
                let _ = done_tx.send(());
            })
            .map_err(JournalError::Thread)?;
        Ok((Journal { shared, done: Mutex::new(Some(done_rx)) }, loaded))
    }

    /// Collects one write for the next commit and numbers it. Called under
    /// the writing space's lock, so numbers follow the map's order per key.
    pub(crate) fn record(&self, tenant: &str, key: &str, value: Option<&[u8]>) -> Ticket {
        let mut pending = lock(&self.shared.pending);
        let was_empty = pending.writes == 0;
        let keys = match pending.batch.get_mut(tenant) {
            Some(keys) => keys,
            None => pending.batch.entry(tenant.to_string()).or_default(),
        };
        let fresh = match keys.get_mut(key) {
            Some(slot) => {
                // A counter bumped again before the commit: its buffer is reused.
                match (slot.as_mut(), value) {
                    (Some(old), Some(new)) => {
                        old.clear();
                        old.extend_from_slice(new);
                    }
                    _ => *slot = value.map(<[u8]>::to_vec),
                }
                false
            }
            None => {
                keys.insert(key.to_string(), value.map(<[u8]>::to_vec));
                true
            }
        };
        pending.writes += usize::from(fresh);
        pending.last += 1;
        if was_empty {
            pending.since = Some(Instant::now());
        }
        let ticket = Ticket(pending.last);
        drop(pending);
        if was_empty {
            self.shared.wake.notify_one();
        }
        ticket
    }

    /// Waits until the write numbered `ticket` is on disk; in relaxed mode,
    /// returns at once.
    pub async fn durable(&self, ticket: Ticket) -> Result<(), KvError> {
        if matches!(self.shared.durability, Durability::Relaxed(_)) {
            return Ok(());
        }
        let t = ticket.0;
        let outcome = |p: &Progress| -> Option<Result<(), KvError>> {
            if p.durable >= t {
                Some(Ok(()))
            } else if p.failed_upto >= t {
                let reason = p.error.as_deref().unwrap_or("commit failed");
                Some(Err(KvError::Unavailable { reason: reason.to_string() }))
            } else {
                None
            }
        };
        if let Some(done) = outcome(&self.shared.progress.borrow()) {
            return done;
        }
        let mut rx = self.shared.progress.subscribe();
        let _waiting = Waiting::new(&self.shared);
        let waited = tokio::time::timeout(COMMIT_WAIT, async {
            rx.wait_for(|p| outcome(p).is_some()).await.map(|p| outcome(&p).unwrap_or(Ok(())))
        })
        .await;
        match waited {
            Ok(Ok(done)) => done,
            Ok(Err(_)) => Err(KvError::Unavailable { reason: "the store is closed".into() }),
            Err(_) => Err(KvError::Unavailable {
                reason: format!("{}: no commit within {} s", self.shared.path.display(), COMMIT_WAIT.as_secs()),
            }),
        }
    }

    pub fn metrics(&self) -> KvMetrics {
        let s = &self.shared;
        KvMetrics {
            commits: s.commits.load(Relaxed),
            committed_writes: s.committed_writes.load(Relaxed),
            errors: s.errors.load(Relaxed),
        }
    }

    /// Commits what is pending, then stops the committer; waits at most
    /// `within` for it.
    pub fn close(&self, within: Duration) {
        lock(&self.shared.pending).closing = true;
        self.shared.wake.notify_one();
        if let Some(done) = lock(&self.done).take() {
            if done.recv_timeout(within).is_err() {
                tracing::error!(path = %self.shared.path.display(), "kv: the last commit did not end in {within:?}");
            }
        }
    }
}

/// A call waiting for a commit, counted while it waits (even if its
/// future is dropped): the committer commits at once when one waits.
struct Waiting<'a>(&'a Shared);

impl<'a> Waiting<'a> {
    fn new(shared: &'a Shared) -> Self {
        // Told under the lock, so the committer cannot miss it.
        let mut pending = lock(&shared.pending);
        pending.waiters += 1;
        pending.eager_until = Some(Instant::now() + EAGER_FOR);
        drop(pending);
        shared.wake.notify_one();
        Waiting(shared)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(&self.0.pending).waiters -= 1;
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        lock(&self.shared.pending).closing = true;
        self.shared.wake.notify_one();
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

fn open_error(path: &Path, e: redb::DatabaseError) -> JournalError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => JournalError::InUse { path: path.to_path_buf() },
        other => JournalError::Open { path: path.to_path_buf(), reason: other.to_string() },
    }
}

/// Checks the layout (writing it into a new file) and reads every key.
fn check_and_read(db: &redb::Database, path: &Path) -> Result<Loaded, JournalError> {
    let fail = |e: &dyn std::fmt::Display| JournalError::Open { path: path.to_path_buf(), reason: e.to_string() };
    let txn = db.begin_write().map_err(|e| fail(&e))?;
    {
        let mut meta = txn.open_table(META).map_err(|e| fail(&e))?;
        let found = meta.get("format").map_err(|e| fail(&e))?.map(|v| v.value());
        match found {
            Some(FORMAT) => {}
            Some(found) => return Err(JournalError::Format { path: path.to_path_buf(), found }),
            None => {
                meta.insert("format", FORMAT).map_err(|e| fail(&e))?;
            }
        }
        txn.open_table(KV).map_err(|e| fail(&e))?;
    }
    txn.commit().map_err(|e| fail(&e))?;
    let read = db.begin_read().map_err(|e| fail(&e))?;
    let table = read.open_table(KV).map_err(|e| fail(&e))?;
    let mut loaded = Loaded::new();
    for row in table.iter().map_err(|e| fail(&e))? {
        let (k, v) = row.map_err(|e| fail(&e))?;
        let (tenant, key) = k.value();
        loaded.entry(tenant.to_string()).or_default().push((key.to_string(), v.value().to_vec()));
    }
    Ok(loaded)
}

/// The files, as the committer thread owns them.
struct Store {
    /// None after a failed checkpoint: redb refuses every write after an
    /// I/O error until the file is opened again.
    db: Option<redb::Database>,
    wal: Wal,
    /// What the log holds that redb does not yet (latest per key).
    unchecked: Batch,
    checkpointed: Instant,
}

impl Store {
    /// Makes `batch` durable: one frame in the log. A checkpoint that is
    /// due follows; its failure leaves the writes safe in the log.
    /// On failure the batch comes back, to be retried.
    fn commit(&mut self, shared: &Shared, batch: Batch) -> Result<(), (std::io::Error, Batch)> {
        if let Err(e) = self.wal.append(&batch) {
            return Err((e, batch));
        }
        for (tenant, keys) in batch {
            self.unchecked.entry(tenant).or_default().extend(keys);
        }
        if self.wal.len() >= CHECKPOINT_BYTES || self.checkpointed.elapsed() >= CHECKPOINT_EVERY {
            self.checkpoint(shared);
        }
        Ok(())
    }

    /// Moves what the log holds into redb and empties the log.
    fn checkpoint(&mut self, shared: &Shared) {
        self.checkpointed = Instant::now();
        if self.wal.len() == 0 {
            return;
        }
        let done = match self.db.take() {
            Some(open) => commit(&open, &self.unchecked).map(|()| open),
            None => redb::Database::create(&shared.path)
                .map_err(redb::Error::from)
                .and_then(|open| commit(&open, &self.unchecked).map(|()| open)),
        };
        match done {
            Ok(open) => {
                self.db = Some(open);
                self.unchecked.clear();
                if let Err(e) = self.wal.reset() {
                    tracing::error!(path = %self.wal.path().display(), "kv: cannot empty the log after a checkpoint: {e}");
                }
            }
            Err(e) => tracing::error!(
                path = %shared.path.display(),
                "kv: checkpoint failed: {e}; the writes stay in {} and the next checkpoint retries",
                self.wal.path().display()
            ),
        }
    }
}

/// The committer thread: commits whatever is pending, until closed.
fn committer(shared: &Shared, mut store: Store) {
    let mut retry = MIN_RETRY;
    let mut logged: Option<Instant> = None;
    loop {
        let (batch, writes, upto, closing) = {
            let mut pending = lock(&shared.pending);
            loop {
                let due = match (pending.writes, pending.since) {
                    _ if pending.closing => break,
                    (0, _) | (_, None) => None,
                    // Relaxed mode paces itself after each commit.
                    _ if pending.waiters > 0 || shared.durability != Durability::Sync => break,
                    _ if pending.eager_until.is_some_and(|t| t > Instant::now()) => break,
                    (_, Some(since)) => Some(UNWAITED.saturating_sub(since.elapsed())).filter(|d| !d.is_zero()),
                };
                pending = match due {
                    None if pending.writes > 0 => break,
                    None => shared.wake.wait(pending).unwrap_or_else(std::sync::PoisonError::into_inner),
                    Some(left) => match shared.wake.wait_timeout(pending, left) {
                        Ok((guard, _)) => guard,
                        Err(poisoned) => poisoned.into_inner().0,
                    },
                };
            }
            pending.since = None;
            (std::mem::take(&mut pending.batch), std::mem::take(&mut pending.writes), pending.last, pending.closing)
        };
        if writes == 0 && closing {
            store.checkpoint(shared);
            return;
        }
        match store.commit(shared, batch) {
            Ok(()) => {
                retry = MIN_RETRY;
                if logged.take().is_some() {
                    tracing::info!(path = %shared.path.display(), "kv: commits succeed again");
                }
                shared.commits.fetch_add(1, Relaxed);
                shared.committed_writes.fetch_add(writes as u64, Relaxed);
                shared.progress.send_modify(|p| {
                    p.durable = upto;
                    p.error = None;
                });
            }
            Err((e, kept)) => {
                shared.errors.fetch_add(1, Relaxed);
                let reason: Arc<str> = format!("{}: {e}", store.wal.path().display()).into();
                if logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                    logged = Some(Instant::now());
                    tracing::error!(
                        path = %shared.path.display(),
                        writes,
                        "kv: commit failed: {reason}; the writes wait in memory and are retried (calls that made them got an error)"
                    );
                }
                shared.progress.send_modify(|p| {
                    p.failed_upto = upto;
                    p.error = Some(reason);
                });
                give_back(shared, kept);
                if closing {
                    tracing::error!(path = %shared.path.display(), "kv: stopping with writes not on disk");
                    return;
                }
                pause(shared, retry);
                retry = (retry * 2).min(MAX_RETRY);
                continue;
            }
        }
        if let Durability::Relaxed(every) = shared.durability {
            pause(shared, every);
        }
    }
}

/// Sleeps `how_long`, or less when the journal is closing.
fn pause(shared: &Shared, how_long: Duration) {
    let until = Instant::now() + how_long;
    let mut pending = lock(&shared.pending);
    while !pending.closing {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        pending = match shared.wake.wait_timeout(pending, left) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        };
    }
}

fn commit(db: &redb::Database, batch: &Batch) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    {
        let mut table = txn.open_table(KV)?;
        for (tenant, keys) in batch {
            for (key, value) in keys {
                match value {
                    Some(v) => {
                        table.insert((tenant.as_str(), key.as_str()), v.as_slice())?;
                    }
                    None => {
                        table.remove((tenant.as_str(), key.as_str()))?;
                    }
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

/// Puts a failed batch back, under what was written since (newer wins).
fn give_back(shared: &Shared, batch: Batch) {
    let mut pending = lock(&shared.pending);
    let mut added = 0;
    for (tenant, keys) in batch {
        let slot = pending.batch.entry(tenant).or_default();
        for (key, value) in keys {
            if let std::collections::hash_map::Entry::Vacant(v) = slot.entry(key) {
                v.insert(value);
                added += 1;
            }
        }
    }
    pending.writes += added;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(dir: &Path) -> Loaded {
        let (journal, loaded) = Journal::open(dir, Durability::Sync).expect("open");
        journal.close(Duration::from_secs(5));
        loaded
    }

    #[tokio::test]
    async fn writes_survive_a_reopen_and_deletes_stay_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, loaded) = Journal::open(dir.path(), Durability::Sync).unwrap();
        assert!(loaded.is_empty());
        journal.record("a", "k1", Some(b"v1"));
        journal.record("b", "k1", Some(b"other tenant"));
        journal.record("a", "k2", Some(b"gone"));
        let t = journal.record("a", "k2", None);
        journal.durable(t).await.unwrap();
        assert!(journal.metrics().commits >= 1);
        journal.close(Duration::from_secs(5));
        drop(journal);
        let loaded = read_all(dir.path());
        assert_eq!(loaded["a"], vec![("k1".to_string(), b"v1".to_vec())]);
        assert_eq!(loaded["b"], vec![("k1".to_string(), b"other tenant".to_vec())]);
    }

    #[tokio::test]
    async fn relaxed_writes_are_committed_by_close() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), Durability::Relaxed(Duration::from_secs(3600))).unwrap();
        journal.record("a", "first", Some(b"1"));
        // The first commit starts at once; the second waits out the hour
        // unless close cuts it short.
        std::thread::sleep(Duration::from_millis(200));
        journal.record("a", "second", Some(b"2"));
        journal.close(Duration::from_secs(5));
        drop(journal);
        assert_eq!(read_all(dir.path())["a"].len(), 2);
    }

    #[test]
    fn a_second_daemon_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(dir.path(), Durability::Sync).unwrap();
        let err = Journal::open(dir.path(), Durability::Sync).err().expect("refused");
        assert!(matches!(err, JournalError::InUse { .. }), "{err}");
        journal.close(Duration::from_secs(5));
    }

    #[test]
    fn garbage_and_other_layouts_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), vec![0x5a; 8192]).unwrap();
        let err = Journal::open(dir.path(), Durability::Sync).err().expect("refused");
        assert!(err.to_string().contains("kv.redb"), "{err}");
        assert!(matches!(err, JournalError::Open { .. }), "{err}");

        let dir = tempfile::tempdir().unwrap();
        {
            let db = redb::Database::create(dir.path().join(FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert("format", 7).unwrap();
            txn.commit().unwrap();
        }
        let err = Journal::open(dir.path(), Durability::Sync).err().expect("refused");
        assert!(matches!(err, JournalError::Format { found: 7, .. }), "{err}");
    }
}
