//! The file operations the disk queue performs, behind a seam: [`RealStorage`] passes them to
//! the operating system; [`FaultStorage`] (for tests) adds the faults a gateway's storage
//! really produces, so the queue's promises can be checked under them.
//!
//! The seam is deliberately small — open, positional read and write, set_len, fsync, remove,
//! rename, fsync of a directory, listing — because those are the only operations whose
//! ordering the queue's crash safety depends on.
//!
//! # The faults [`FaultStorage`] models
//!
//! ```text
//! fault                     what the queue sees                     lifted by
//! fill_after(n)             ENOSPC once n more bytes were added;     lift_faults()
//!                           a write that crosses the limit writes
//!                           what fits, then fails (a short write);
//!                           truncating and removing files free space
//! fail_next_fsync()         EIO from the next file fsync; that file  one-shot; the
//!                           is then "poisoned": later fsyncs report   poisoning ends
//!                           success but make nothing durable, as      with power_cut()
//!                           Linux may drop dirty pages after a failed
//!                           fsync and not report it again
//! read_only(true)           EROFS from every mutation (open for       read_only(false),
//!                           writing, write, set_len, remove, rename)  lift_faults()
//! fail_next_reads(n)        EIO from the next n file reads (a bad      one-shot each;
//!                           sector, a card going away)                lift_faults()
//! fail_reads(true)          EIO from every read and every open for    fail_reads(false),
//!                           reading (an SD card failing under reads)  lift_faults()
//! slow_opens(d)             each open for reading takes `d` (a slow    slow_opens(ZERO)
//!                           card), widening the window between
//!                           choosing a file and opening it
//! power_cut()               every file loses what was written since   (immediate)
//!                           its last successful fsync: appended bytes
//!                           are cut, overwritten bytes and truncated
//!                           bytes come back
//! ```
//!
//! Directory entries (create, rename, remove) are treated as durable at once: the queue fsyncs
//! the directory after each of them anyway, and the power cut models file contents only.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// `ENOSPC` on Linux: no space left on device.
const ENOSPC: i32 = 28;
/// `EIO` on Linux: input/output error.
const EIO: i32 = 5;
/// `EROFS` on Linux: read-only file system.
const EROFS: i32 = 30;

/// How a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// An existing file, for reading.
    Read,
    /// An existing file, for reading and writing.
    Write,
    /// A new, empty file for reading and writing (an existing one is truncated).
    Create,
    /// For reading and writing, created empty when missing, kept when present.
    OpenOrCreate,
}

/// An open file: positional I/O only, so a handle can be shared without a cursor.
pub trait StorageFile: Send + Sync {
    /// The file's current length in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; an error when the file ends first.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`; on an error part of it may have been written.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Cuts or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// fdatasync: the data written so far (and the length) survives a power cut.
    fn sync_data(&self) -> io::Result<()>;
    /// fsync: data and metadata survive a power cut.
    fn sync_all(&self) -> io::Result<()>;
}

/// The file system operations of the disk queue.
pub trait Storage: Send + Sync + 'static {
    /// Creates `dir` and its parents when missing.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The paths of the entries of `dir`, in no particular order.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    /// Opens `path` as `mode` says.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Renames a file, replacing `to` atomically if it exists.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// fsyncs a directory, making the creations, renames and removals in it durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The operating system's file system, unchanged.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealStorage;

impl StorageFile for File {
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
    fn sync_all(&self) -> io::Result<()> {
        File::sync_all(self)
    }
}

fn open_real(path: &Path, mode: OpenMode) -> io::Result<File> {
    let mut options = OpenOptions::new();
    match mode {
        OpenMode::Read => options.read(true),
        OpenMode::Write => options.read(true).write(true),
        OpenMode::Create => options.read(true).write(true).create(true).truncate(true),
        OpenMode::OpenOrCreate => options.read(true).write(true).create(true).truncate(false),
    };
    options.open(path)
}

impl Storage for RealStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        fs::read_dir(dir)?
            .map(|entry| entry.map(|e| e.path()))
            .collect()
    }
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>> {
        Ok(Box::new(open_real(path, mode)?))
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// A real directory with injectable faults. **For tests**: it keeps, per file, what a power cut
/// would undo, which costs memory and a read before every overwrite.
///
/// Clones share their state: keep one to inject faults and count fsyncs, and hand another to
/// the queue (`DiskQueue::open_with`).
#[derive(Clone, Default)]
pub struct FaultStorage {
    state: Arc<Mutex<FaultState>>,
}

impl std::fmt::Debug for FaultStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultStorage").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct FaultState {
    /// What a power cut would undo, per file (an inode number of our own).
    files: HashMap<u64, Tracked>,
    /// Which file each path names now.
    paths: HashMap<PathBuf, u64>,
    next_id: u64,
    /// Bytes that may still be added before writes fail with ENOSPC (`None`: unlimited).
    free: Option<u64>,
    fail_next_fsync: bool,
    /// File reads still to fail with EIO.
    failing_reads: u32,
    /// How long each open for reading takes.
    slow_opens: std::time::Duration,
    read_only: bool,
    /// Reads and opens for reading fail with EIO.
    reads_fail: bool,
    /// Successful file fsyncs, by file name.
    syncs: HashMap<String, u64>,
    /// Successful directory fsyncs.
    dir_syncs: u64,
}

struct Tracked {
    /// The path it has now; `None` once removed.
    path: Option<PathBuf>,
    /// Length at the last successful fsync.
    synced_len: u64,
    /// Bytes below `synced_len` overwritten or cut since then: (offset, old bytes), oldest
    /// first.
    undo: Vec<(u64, Vec<u8>)>,
    /// A fsync failed: later ones report success but make nothing durable.
    poisoned: bool,
}

fn os_error(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

impl FaultState {
    /// The id of the file at `path`, tracking it (as durable as it is now) on first sight.
    fn track(&mut self, path: &Path, current_len: u64) -> u64 {
        if let Some(id) = self.paths.get(path) {
            return *id;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.paths.insert(path.to_owned(), id);
        self.files.insert(
            id,
            Tracked {
                path: Some(path.to_owned()),
                synced_len: current_len,
                undo: Vec::new(),
                poisoned: false,
            },
        );
        id
    }

    fn check_readable(&self) -> io::Result<()> {
        if self.reads_fail {
            return Err(os_error(EIO));
        }
        Ok(())
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(os_error(EROFS));
        }
        Ok(())
    }

    /// Takes `grow` bytes of free space; returns how many were available when not all were.
    fn take_space(&mut self, grow: u64) -> Result<(), u64> {
        match self.free {
            None => Ok(()),
            Some(free) if free >= grow => {
                self.free = Some(free - grow);
                Ok(())
            }
            Some(free) => {
                self.free = Some(0);
                Err(free)
            }
        }
    }

    fn give_space(&mut self, bytes: u64) {
        if let Some(free) = &mut self.free {
            *free += bytes;
        }
    }
}

impl FaultStorage {
    /// A fault-free storage; inject faults with the methods below.
    pub fn new() -> FaultStorage {
        FaultStorage::default()
    }

    fn lock(&self) -> MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on, writes that add more than `bytes` bytes in total fail with ENOSPC (the last
    /// one after writing what fits). Truncating and removing files gives space back.
    pub fn fill_after(&self, bytes: u64) {
        self.lock().free = Some(bytes);
    }

    /// The next file fsync fails with EIO, and that file's later fsyncs make nothing durable.
    pub fn fail_next_fsync(&self) {
        self.lock().fail_next_fsync = true;
    }

    /// The next `n` file reads fail with EIO (reads of the segments, the ack file).
    pub fn fail_next_reads(&self, n: u32) {
        self.lock().failing_reads = n;
    }

    /// Each open for reading takes `delay` from now on (`Duration::ZERO`: at once).
    pub fn slow_opens(&self, delay: std::time::Duration) {
        self.lock().slow_opens = delay;
    }

    /// The process restarted (kill -9, not a power cut): one-shot faults still pending are
    /// dropped, and files poisoned by a failed fsync take durable writes again, as a new
    /// process's writes to them reach the disk (what the failed fsync lost stays lost, but the
    /// queue never acknowledged it). A full or read-only disk stays so.
    pub fn process_restarted(&self) {
        let mut state = self.lock();
        state.fail_next_fsync = false;
        state.failing_reads = 0;
        for tracked in state.files.values_mut() {
            tracked.poisoned = false;
        }
    }

    /// Every mutation fails with EROFS while `on` (a file system remounted read-only).
    pub fn read_only(&self, on: bool) {
        self.lock().read_only = on;
    }

    /// Every read, and every open for reading, fails with EIO while `on`.
    pub fn fail_reads(&self, on: bool) {
        self.lock().reads_fail = on;
    }

    /// Ends every fault: unlimited space, writable, readable, no pending fsync failure.
    pub fn lift_faults(&self) {
        let mut state = self.lock();
        state.free = None;
        state.read_only = false;
        state.reads_fail = false;
        state.fail_next_fsync = false;
        state.failing_reads = 0;
    }

    /// Successful fsyncs of files named `name` (e.g. `"ack"`) so far.
    pub fn syncs_of(&self, name: &str) -> u64 {
        self.lock().syncs.get(name).copied().unwrap_or(0)
    }

    /// Successful directory fsyncs so far.
    pub fn dir_syncs(&self) -> u64 {
        self.lock().dir_syncs
    }

    /// Loses everything not made durable, as a power cut does: each file is cut back to its
    /// length at its last successful fsync, and bytes overwritten or cut since then come back.
    /// Stop the queue first (`DiskQueue::abandon`), then reopen it with this storage. Files
    /// poisoned by a failed fsync become ordinary again (the machine restarted).
    pub fn power_cut(&self) -> io::Result<()> {
        let mut state = self.lock();
        for tracked in state.files.values_mut() {
            let Some(path) = &tracked.path else { continue };
            let file = OpenOptions::new().write(true).open(path)?;
            file.set_len(tracked.synced_len)?;
            for (offset, old) in tracked.undo.iter().rev() {
                FileExt::write_all_at(&file, old, *offset)?;
            }
            file.sync_all()?;
            tracked.undo.clear();
            tracked.poisoned = false;
        }
        Ok(())
    }
}

impl Storage for FaultStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        if !dir.is_dir() {
            self.lock().check_writable()?;
        }
        fs::create_dir_all(dir)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        RealStorage.list_dir(dir)
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn StorageFile>> {
        if mode == OpenMode::Read {
            self.lock().check_readable()?;
            let delay = self.lock().slow_opens;
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
        } else {
            self.lock().check_writable()?;
        }
        let existing_len = fs::metadata(path).map(|m| m.len()).ok();
        // Truncation is done below through the fault layer, so a power cut can undo it.
        let real_mode = if mode == OpenMode::Create {
            OpenMode::OpenOrCreate
        } else {
            mode
        };
        let file = open_real(path, real_mode)?;
        let id = self.lock().track(path, existing_len.unwrap_or(0));
        let file = FaultFile {
            file,
            id,
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            state: self.state.clone(),
        };
        if mode == OpenMode::Create {
            file.set_len(0)?;
        }
        Ok(Box::new(file))
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.check_writable()?;
        let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        fs::remove_file(path)?;
        state.give_space(len);
        if let Some(id) = state.paths.remove(path)
            && let Some(tracked) = state.files.get_mut(&id)
        {
            tracked.path = None;
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.lock();
        state.check_writable()?;
        fs::rename(from, to)?;
        if let Some(replaced) = state.paths.remove(to)
            && let Some(tracked) = state.files.get_mut(&replaced)
        {
            tracked.path = None;
        }
        if let Some(id) = state.paths.remove(from) {
            state.paths.insert(to.to_owned(), id);
            if let Some(tracked) = state.files.get_mut(&id) {
                tracked.path = Some(to.to_owned());
            }
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        RealStorage.sync_dir(dir)?;
        self.lock().dir_syncs += 1;
        Ok(())
    }
}

/// A file of a [`FaultStorage`].
struct FaultFile {
    file: File,
    id: u64,
    /// The file name when opened, for counting fsyncs.
    name: String,
    state: Arc<Mutex<FaultState>>,
}

impl FaultFile {
    fn lock(&self) -> MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers the bytes in `[from, to)` that are durable now, before they change.
    fn save_undo(&self, state: &mut FaultState, from: u64, to: u64) -> io::Result<()> {
        let Some(tracked) = state.files.get_mut(&self.id) else {
            return Ok(());
        };
        let to = to.min(tracked.synced_len).min(self.file.metadata()?.len());
        if from >= to {
            return Ok(());
        }
        let mut old = vec![0u8; (to - from) as usize];
        FileExt::read_exact_at(&self.file, &mut old, from)?;
        tracked.undo.push((from, old));
        Ok(())
    }

    fn sync(&self, all: bool) -> io::Result<()> {
        let mut state = self.lock();
        if state.fail_next_fsync {
            state.fail_next_fsync = false;
            if let Some(tracked) = state.files.get_mut(&self.id) {
                tracked.poisoned = true;
            }
            return Err(os_error(EIO));
        }
        if all {
            self.file.sync_all()?;
        } else {
            self.file.sync_data()?;
        }
        let len = self.file.metadata()?.len();
        if let Some(tracked) = state.files.get_mut(&self.id)
            && !tracked.poisoned
        {
            tracked.synced_len = len;
            tracked.undo.clear();
        }
        *state.syncs.entry(self.name.clone()).or_default() += 1;
        Ok(())
    }
}

impl StorageFile for FaultFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        {
            let mut state = self.lock();
            state.check_readable()?;
            if state.failing_reads > 0 {
                state.failing_reads -= 1;
                return Err(os_error(EIO));
            }
        }
        FileExt::read_exact_at(&self.file, buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut state = self.lock();
        state.check_writable()?;
        let len = self.file.metadata()?.len();
        let end = offset + buf.len() as u64;
        let fits = match state.take_space(end.saturating_sub(len)) {
            Ok(()) => buf.len(),
            // A short write: what fits lands, then ENOSPC.
            Err(free) => (len + free).saturating_sub(offset).min(buf.len() as u64) as usize,
        };
        self.save_undo(&mut state, offset, offset + fits as u64)?;
        FileExt::write_all_at(&self.file, &buf[..fits], offset)?;
        if fits < buf.len() {
            return Err(os_error(ENOSPC));
        }
        Ok(())
    }

    fn set_len(&self, new_len: u64) -> io::Result<()> {
        let mut state = self.lock();
        state.check_writable()?;
        let len = self.file.metadata()?.len();
        if new_len > len {
            if state.take_space(new_len - len).is_err() {
                return Err(os_error(ENOSPC));
            }
        } else {
            self.save_undo(&mut state, new_len, len)?;
            state.give_space(len - new_len);
        }
        self.file.set_len(new_len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.sync(false)
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync(true)
    }
}
