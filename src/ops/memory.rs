//! Gives back, once the daemon is up, the pages of its own executable that only the dynamic
//! loader reads: the relocation table (`.rela.dyn`; `.rel.dyn` on 32-bit ARM).
//!
//! A position-independent executable carries one relocation per pointer in its read-only data
//! (vtables, string tables, the SDK's and the TLS stack's static tables): 0.45 MiB here. The
//! loader reads the table once, before `main`, to fix those pointers up, and nothing reads it
//! again; but its pages stay mapped and counted in the daemon's resident memory for as long as
//! it runs. `madvise(MADV_DONTNEED)` unmaps them: they are clean pages of a read-only file
//! mapping, so if anything ever read them again the kernel would read them back from the file.
//!
//! Invariants:
//! - Only whole pages inside the table are given back, and only when the table lies in a
//!   loadable segment that is read-only (not writable, not executable) and outside the segment
//!   the loader makes read-only after relocating (`PT_GNU_RELRO`, whose pages are private
//!   copies: dropping them would undo the relocations).
//! - Anything unexpected (no such section, another layout, a read error) gives back nothing.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

const PT_LOAD: u32 = 1;
const PT_GNU_RELRO: u32 = 0x6474_e552;
const PF_X: u32 = 1;
const PF_W: u32 = 2;

/// What reading the executable's headers can go wrong with.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot read the executable's headers: {0}")]
    Read(#[from] io::Error),
    #[error("the executable's headers are not as expected: {0}")]
    Layout(&'static str),
    #[error("cannot give the relocation table's pages back: {0}")]
    Advise(io::Error),
}

/// One program header, as far as this needs it.
#[derive(Debug, Clone, Copy)]
struct Segment {
    kind: u32,
    flags: u32,
    offset: u64,
    vaddr: u64,
    memsz: u64,
}

/// The ELF headers this needs, read from the file.
#[derive(Debug)]
struct Headers {
    phoff: u64,
    segments: Vec<Segment>,
    /// Start (link-time address) and size of the relocation table, if the file has one.
    relocations: Option<(u64, u64)>,
}

/// Reads `len` bytes at `offset`.
fn read_at(file: &File, offset: u64, len: usize) -> Result<Vec<u8>, MemoryError> {
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// A little-endian field of `width` bytes at `at`.
fn field(bytes: &[u8], at: usize, width: usize) -> Result<u64, MemoryError> {
    let raw = bytes
        .get(at..at + width)
        .ok_or(MemoryError::Layout("a header is shorter than its fields"))?;
    Ok(raw
        .iter()
        .rev()
        .fold(0u64, |acc, byte| (acc << 8) | u64::from(*byte)))
}

/// Reads the program headers and the relocation table's place from an ELF file (32 or 64-bit,
/// little-endian: the targets the bridge is built for).
fn read_headers(file: &File) -> Result<Headers, MemoryError> {
    let ident = read_at(file, 0, 64)?;
    if ident.get(..4) != Some(b"\x7fELF".as_slice()) || ident.get(5) != Some(&1) {
        return Err(MemoryError::Layout("not a little-endian ELF file"));
    }
    let wide = match ident.get(4) {
        Some(2) => true,
        Some(1) => false,
        _ => return Err(MemoryError::Layout("neither 32 nor 64-bit")),
    };
    // (offset, width) of each field, for 64 and 32-bit files.
    let at = |wide_at: (usize, usize), narrow_at: (usize, usize)| {
        let (offset, width) = if wide { wide_at } else { narrow_at };
        field(&ident, offset, width)
    };
    let phoff = at((32, 8), (28, 4))?;
    let shoff = at((40, 8), (32, 4))?;
    let phentsize = at((54, 2), (42, 2))? as usize;
    let phnum = at((56, 2), (44, 2))? as usize;
    let shentsize = at((58, 2), (46, 2))? as usize;
    let shnum = at((60, 2), (48, 2))? as usize;
    let shstrndx = at((62, 2), (50, 2))? as usize;

    let table = read_at(file, phoff, phentsize * phnum)?;
    let mut segments = Vec::with_capacity(phnum);
    for i in 0..phnum {
        let p = &table[i * phentsize..(i + 1) * phentsize];
        let get = |w: (usize, usize), n: (usize, usize)| {
            let (offset, width) = if wide { w } else { n };
            field(p, offset, width)
        };
        segments.push(Segment {
            kind: get((0, 4), (0, 4))? as u32,
            flags: get((4, 4), (24, 4))? as u32,
            offset: get((8, 8), (4, 4))?,
            vaddr: get((16, 8), (8, 4))?,
            memsz: get((40, 8), (20, 4))?,
        });
    }

    let sections = read_at(file, shoff, shentsize * shnum)?;
    let section = |i: usize| -> Result<(u64, u64, u64, u64), MemoryError> {
        let s = sections
            .get(i * shentsize..(i + 1) * shentsize)
            .ok_or(MemoryError::Layout("a section index is out of range"))?;
        let get = |w: (usize, usize), n: (usize, usize)| {
            let (offset, width) = if wide { w } else { n };
            field(s, offset, width)
        };
        // name, address, file offset, size
        Ok((
            get((0, 4), (0, 4))?,
            get((16, 8), (12, 4))?,
            get((24, 8), (16, 4))?,
            get((32, 8), (20, 4))?,
        ))
    };
    let (_, _, names_at, names_len) = section(shstrndx)?;
    let names = read_at(file, names_at, names_len as usize)?;
    let mut relocations = None;
    for i in 0..shnum {
        let (name, addr, _, size) = section(i)?;
        let name = names
            .get(name as usize..)
            .and_then(|rest| rest.split(|b| *b == 0).next())
            .unwrap_or_default();
        if name == b".rela.dyn" || name == b".rel.dyn" {
            relocations = Some((addr, size));
        }
    }
    Ok(Headers {
        phoff,
        segments,
        relocations,
    })
}

/// The page-aligned range (link-time addresses) of the relocation table that may be given
/// back, if any (see the module's invariants).
fn releasable(headers: &Headers, page: u64) -> Option<(u64, u64)> {
    let (start, size) = headers.relocations?;
    let end = start.checked_add(size)?;
    let inside = |s: &Segment| s.vaddr <= start && end <= s.vaddr + s.memsz;
    let read_only = headers
        .segments
        .iter()
        .any(|s| s.kind == PT_LOAD && s.flags & (PF_W | PF_X) == 0 && inside(s));
    let relro = headers
        .segments
        .iter()
        .any(|s| s.kind == PT_GNU_RELRO && s.vaddr < end && start < s.vaddr + s.memsz);
    let first = start.div_ceil(page) * page;
    let last = end / page * page;
    (read_only && !relro && first < last).then_some((first, last))
}

/// Gives back the pages of the running executable's relocation table; returns how many bytes.
/// Call once, after start-up.
pub fn release_loader_pages() -> Result<usize, MemoryError> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let file = File::open("/proc/self/exe")?;
        let headers = read_headers(&file)?;
        // SAFETY: getauxval and sysconf only read values the kernel gave the process.
        let (at_phdr, page) = unsafe {
            (
                libc::getauxval(libc::AT_PHDR),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let page = u64::try_from(page).map_err(|_| MemoryError::Layout("no page size"))?;
        // Where the loader put the file: the program headers' address in memory, less their
        // link-time address (the first loadable segment maps the file from offset 0).
        let first = headers
            .segments
            .iter()
            .find(|s| s.kind == PT_LOAD && s.offset == 0)
            .ok_or(MemoryError::Layout("no segment maps the file's start"))?;
        // `c_ulong`: 32 bits on armv7, 64 on aarch64 and x86_64.
        #[allow(clippy::useless_conversion)]
        let at_phdr = u64::from(at_phdr);
        let base = at_phdr
            .checked_sub(first.vaddr + headers.phoff)
            .ok_or(MemoryError::Layout(
                "the program headers are not where expected",
            ))?;
        let Some((from, to)) = releasable(&headers, page) else {
            return Ok(0);
        };
        let len = (to - from) as usize;
        // SAFETY: the range is whole pages of a read-only, clean file mapping of this
        // executable that nothing reads after start-up (module invariants); MADV_DONTNEED only
        // unmaps them, and a later read would map them from the file again.
        let done =
            unsafe { libc::madvise((base + from) as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        if done != 0 {
            return Err(MemoryError::Advise(io::Error::last_os_error()));
        }
        Ok(len)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binary_s_relocation_table_is_found_in_a_read_only_segment() {
        let file = File::open("/proc/self/exe").expect("own executable");
        let headers = read_headers(&file).expect("headers");
        let (start, size) = headers.relocations.expect("a PIE has a relocation table");
        assert!(size > 0);
        let (from, to) = releasable(&headers, 4096).expect("whole pages to give back");
        assert!(start <= from && to <= start + size);
        assert_eq!(from % 4096, 0);
    }

    #[test]
    fn giving_the_pages_back_leaves_the_process_working() {
        let released = release_loader_pages().expect("released");
        assert!(released > 0);
        // Pointers the loader relocated still work: formatting walks vtables and tables.
        let text = format!(
            "{:?} {}",
            vec![Some(1.5f64)],
            std::path::Path::new("/x").display()
        );
        assert_eq!(text, "[Some(1.5)] /x");
    }

    #[test]
    fn a_table_in_a_writable_or_relro_segment_is_left_alone() {
        let segment = |kind, flags| Segment {
            kind,
            flags,
            offset: 0,
            vaddr: 0,
            memsz: 1 << 20,
        };
        let headers = |segments| Headers {
            phoff: 64,
            segments,
            relocations: Some((4096, 3 * 4096)),
        };
        assert_eq!(
            releasable(&headers(vec![segment(PT_LOAD, 4)]), 4096),
            Some((4096, 4 * 4096))
        );
        assert_eq!(
            releasable(&headers(vec![segment(PT_LOAD, 4 | PF_W)]), 4096),
            None
        );
        assert_eq!(
            releasable(
                &headers(vec![segment(PT_LOAD, 4), segment(PT_GNU_RELRO, 4)]),
                4096
            ),
            None
        );
    }
}
