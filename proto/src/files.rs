//! Reading the files a user names (experiments, game days, fault specs, fleet files,
//! policies, TLS material) with a hard limit: only regular files, and at most a few
//! MiB. `gpuchaos validate /dev/zero` or a game day naming a 10 GB file must be a
//! clear error, never a process that reads until memory runs out.

use std::io::Read;
use std::path::Path;

/// The most a YAML input (experiment, game day, fault spec, fleet file, policy) may
/// hold: far above any real one (the largest shipped experiment is under 4 KiB).
pub const MAX_YAML_BYTES: u64 = 16 << 20;
/// The most a PEM file (certificate, key, CA bundle) may hold.
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// Why a file could not be read; the text says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ReadError(pub String);

fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
    } else {
        format!("{} KiB", bytes.div_ceil(1024))
    }
}

fn too_large(what: &str, max: u64) -> ReadError {
    ReadError(format!(
        "{what} is larger than the {} this input may hold: name the right file",
        human(max)
    ))
}

/// Reads a regular file of at most `max` bytes. Directories, devices, pipes and
/// sockets are refused before anything is read; a file that grows while being read
/// stops at the limit.
pub fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    use std::os::unix::fs::OpenOptionsExt;
    let shown = path.display();
    // O_NONBLOCK: opening a FIFO must not wait for a writer (the type check below
    // refuses it); reads of a regular file are not affected by the flag.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| ReadError(format!("cannot read {shown}: {}", io_text(&e))))?;
    let meta = file
        .metadata()
        .map_err(|e| ReadError(format!("cannot read {shown}: {}", io_text(&e))))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err(ReadError(format!(
            "{shown} is a directory: name the files in it"
        )));
    }
    if !ft.is_file() {
        return Err(ReadError(format!(
            "{shown} is not a regular file (a device, pipe or socket): name a file"
        )));
    }
    if meta.len() > max {
        return Err(too_large(&format!("{shown} ({})", human(meta.len())), max));
    }
    read_limited(file, max).map_err(|e| match e {
        Limited::Io(e) => ReadError(format!("cannot read {shown}: {}", io_text(&e))),
        Limited::TooLarge => too_large(&shown.to_string(), max),
    })
}

/// [`read_capped`] as UTF-8 text.
pub fn read_text_capped(path: &Path, max: u64) -> Result<String, ReadError> {
    let bytes = read_capped(path, max)?;
    String::from_utf8(bytes).map_err(|e| {
        ReadError(format!(
            "{} is not UTF-8 text (invalid byte at offset {}): name a YAML file",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}

/// Reads standard input (`-f -`) up to `max` bytes.
pub fn read_stdin_capped(max: u64) -> Result<String, ReadError> {
    let bytes = read_limited(std::io::stdin().lock(), max).map_err(|e| match e {
        Limited::Io(e) => ReadError(format!("reading standard input: {}", io_text(&e))),
        Limited::TooLarge => too_large("standard input", max),
    })?;
    String::from_utf8(bytes).map_err(|e| {
        ReadError(format!(
            "standard input is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })
}

enum Limited {
    Io(std::io::Error),
    TooLarge,
}

fn read_limited(r: impl Read, max: u64) -> Result<Vec<u8>, Limited> {
    let mut buf = Vec::new();
    r.take(max + 1).read_to_end(&mut buf).map_err(Limited::Io)?;
    if buf.len() as u64 > max {
        return Err(Limited::TooLarge);
    }
    Ok(buf)
}

/// An I/O error as a person reads it: "no such file or directory", without the
/// "(os error 2)" tail.
pub fn io_text(e: &std::io::Error) -> String {
    let s = e.to_string();
    let s = match s.find(" (os error") {
        Some(i) => &s[..i],
        None => &s,
    };
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_directories_and_large_files_are_refused_before_reading() {
        let e = read_capped(Path::new("/dev/zero"), MAX_YAML_BYTES).unwrap_err();
        assert!(e.0.contains("not a regular file"), "{e}");
        let dir = std::env::temp_dir();
        let e = read_capped(&dir, MAX_YAML_BYTES).unwrap_err();
        assert!(e.0.contains("is a directory"), "{e}");
        let f = dir.join(format!("gpuchaos-files-test-{}", std::process::id()));
        std::fs::write(&f, vec![b'a'; 2048]).unwrap();
        let e = read_capped(&f, 1024).unwrap_err();
        assert!(e.0.contains("larger than the 1 KiB"), "{e}");
        assert_eq!(read_capped(&f, 4096).unwrap().len(), 2048);
        std::fs::write(&f, [0xff, 0xfe]).unwrap();
        let e = read_text_capped(&f, 4096).unwrap_err();
        assert!(e.0.contains("not UTF-8"), "{e}");
        std::fs::remove_file(&f).unwrap();
        let e = read_capped(&f, 10).unwrap_err();
        assert!(e.0.contains("no such file or directory"), "{e}");
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = std::env::temp_dir().join(format!("gpuchaos-fifo-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        nix::unistd::mkfifo(&dir, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = read_capped(&dir, MAX_YAML_BYTES).unwrap_err();
        std::fs::remove_file(&dir).unwrap();
        assert!(e.0.contains("not a regular file"), "{e}");
    }

    #[test]
    fn a_stream_stops_at_the_limit() {
        let r = read_limited(std::io::repeat(7), 1000);
        assert!(matches!(r, Err(Limited::TooLarge)));
    }
}
