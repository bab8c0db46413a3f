//! A sandboxed WASI preview1 for proxy-wasm guests, linked as `wasi_snapshot_preview1` and
//! `wasi_unstable`.
//!
//! Why not wasmtime-wasi: its synchronous preview1 runs every call through
//! `tokio::runtime::Handle::block_on`, which panics on a thread that is already driving a tokio
//! runtime, and the dataplane runs filter callbacks on exactly such threads. Guests of a proxy
//! need very little of WASI, the same subset proxy-wasm-cpp-host implements: stdout/stderr
//! (sent to the plugin log), clocks, random bytes, environment variables the operator
//! configured, and benign answers for everything else. There is no file system, no socket,
//! no stdin and no inherited environment: the sandbox is empty by construction.
//!
//! Semantics real toolchains depend on: `fd_prestat_get` answers EBADF (Go's runtime probes
//! preopens from fd 3 up until it does), `poll_oneoff` succeeds and reports every subscription
//! as ready without blocking (a proxy worker must never sleep in a guest), `proc_exit` ends the
//! call (exit 0 during start-up is success), and `random_get` refuses more than 64 KiB.

use std::time::{Instant, SystemTime};

use wasmtime::{Caller, Linker};

use crate::abi::LogLevel;
use crate::limits::{
    MAX_LOG_MESSAGE_BYTES, MAX_RANDOM_GET_BYTES, MAX_STDIO_LINE_BYTES, MAX_STDIO_WRITE_BYTES,
};
use crate::memory::{read_bytes, write_bytes, write_u32, write_u64};
use crate::state::VmState;

type C<'a> = Caller<'a, VmState>;

const SUCCESS: i32 = 0;
const EBADF: i32 = 8;
const EFAULT: i32 = 21;
const EINVAL: i32 = 28;
const ENOTSUP: i32 = 58;

/// The guest called `proc_exit(code)`; carried as the trap's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcExit(pub i32);

impl std::fmt::Display for ProcExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the module called proc_exit({})", self.0)
    }
}

impl std::error::Error for ProcExit {}

fn errno<T>(r: Result<T, crate::abi::Status>) -> i32 {
    match r {
        Ok(_) => SUCCESS,
        Err(_) => EFAULT,
    }
}

/// Appends guest output to the line buffer of fd 1 or 2 and logs every complete line.
fn write_stdio(c: &mut C<'_>, fd: i32, bytes: &[u8]) {
    let idx = (fd - 1) as usize;
    let level = if fd == 1 {
        LogLevel::Info
    } else {
        LogLevel::Error
    };
    let s = c.data_mut();
    s.stdio[idx].extend_from_slice(bytes);
    while let Some(pos) = s.stdio[idx].iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = s.stdio[idx].drain(..=pos).collect();
        s.emit_log(level, stdio_line(&line[..line.len() - 1]));
    }
    if s.stdio[idx].len() > MAX_STDIO_LINE_BYTES {
        let line = std::mem::take(&mut s.stdio[idx]);
        s.emit_log(level, stdio_line(&line));
    }
}

/// One line of guest output as a log message, cut like `proxy_log` messages.
fn stdio_line(line: &[u8]) -> String {
    if line.len() > MAX_LOG_MESSAGE_BYTES {
        let mut text = String::from_utf8_lossy(&line[..MAX_LOG_MESSAGE_BYTES]).into_owned();
        text.push_str("…[truncated]");
        text
    } else {
        String::from_utf8_lossy(line).into_owned()
    }
}

/// Logs whatever partial lines are left in the stdio buffers (after each callback).
pub(crate) fn flush_stdio(s: &mut VmState) {
    for (idx, level) in [(0, LogLevel::Info), (1, LogLevel::Error)] {
        if !s.stdio[idx].is_empty() {
            let line = std::mem::take(&mut s.stdio[idx]);
            s.emit_log(level, stdio_line(&line));
        }
    }
}

fn env_strings(s: &VmState) -> Vec<Vec<u8>> {
    s.env
        .iter()
        .map(|(k, v)| format!("{k}={v}\0").into_bytes())
        .collect()
}

fn monotonic_nanos() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

pub(crate) fn add_to_linker(linker: &mut Linker<VmState>) -> wasmtime::Result<()> {
    const M: &str = "wasi_snapshot_preview1";

    linker.func_wrap(M, "args_sizes_get", |mut c: C<'_>, argc: i32, size: i32| {
        errno(write_u32(&mut c, argc, 0).and_then(|_| write_u32(&mut c, size, 0)))
    })?;
    linker.func_wrap(M, "args_get", |_: C<'_>, _: i32, _: i32| SUCCESS)?;
    linker.func_wrap(
        M,
        "environ_sizes_get",
        |mut c: C<'_>, count: i32, size: i32| {
            let env = env_strings(c.data());
            let total: usize = env.iter().map(Vec::len).sum();
            errno(
                write_u32(&mut c, count, env.len() as u32)
                    .and_then(|_| write_u32(&mut c, size, total as u32)),
            )
        },
    )?;
    linker.func_wrap(M, "environ_get", |mut c: C<'_>, ptrs: i32, buf: i32| {
        let env = env_strings(c.data());
        let mut at = buf as u32;
        for (i, entry) in env.iter().enumerate() {
            let r = write_u32(&mut c, ptrs + (i as i32) * 4, at)
                .and_then(|_| write_bytes(&mut c, at as i32, entry));
            if r.is_err() {
                return EFAULT;
            }
            at += entry.len() as u32;
        }
        SUCCESS
    })?;
    linker.func_wrap(M, "clock_res_get", |mut c: C<'_>, id: i32, ret: i32| {
        if !(0..=3).contains(&id) {
            return EINVAL;
        }
        errno(write_u64(&mut c, ret, 1_000))
    })?;
    linker.func_wrap(
        M,
        "clock_time_get",
        |mut c: C<'_>, id: i32, _precision: i64, ret: i32| {
            let now = match id {
                0 => SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0),
                1..=3 => monotonic_nanos(),
                _ => return EINVAL,
            };
            errno(write_u64(&mut c, ret, now))
        },
    )?;
    linker.func_wrap(M, "random_get", |mut c: C<'_>, ptr: i32, len: i32| {
        let len = len as u32 as usize;
        if len > MAX_RANDOM_GET_BYTES {
            return EINVAL;
        }
        let mut bytes = vec![0u8; len];
        if getrandom::fill(&mut bytes).is_err() {
            return EINVAL;
        }
        errno(write_bytes(&mut c, ptr, &bytes))
    })?;
    linker.func_wrap(
        M,
        "fd_write",
        |mut c: C<'_>, fd: i32, iovs: i32, n: i32, written: i32| {
            if fd != 1 && fd != 2 {
                return EBADF;
            }
            // A short write past MAX_STDIO_WRITE_BYTES: the guest learns how much was taken.
            let mut total = 0usize;
            for i in 0..n.max(0) {
                if total >= MAX_STDIO_WRITE_BYTES {
                    break;
                }
                let Ok(iov) = read_bytes(&c, iovs + i * 8, 8, 8) else {
                    return EFAULT;
                };
                let ptr = i32::from_le_bytes(iov[..4].try_into().expect("4 bytes"));
                let len = i32::from_le_bytes(iov[4..].try_into().expect("4 bytes"));
                let len = (len as u32 as usize).min(MAX_STDIO_WRITE_BYTES - total) as i32;
                let Ok(data) = read_bytes(&c, ptr, len, MAX_STDIO_WRITE_BYTES) else {
                    return EFAULT;
                };
                write_stdio(&mut c, fd, &data);
                total += data.len();
            }
            let total = total as u32;
            errno(write_u32(&mut c, written, total))
        },
    )?;
    linker.func_wrap(M, "fd_read", |_: C<'_>, _: i32, _: i32, _: i32, _: i32| {
        EBADF
    })?;
    linker.func_wrap(M, "fd_close", |_: C<'_>, fd: i32| {
        if (0..=2).contains(&fd) {
            SUCCESS
        } else {
            EBADF
        }
    })?;
    linker.func_wrap(M, "fd_fdstat_get", |mut c: C<'_>, fd: i32, ret: i32| {
        if !(0..=2).contains(&fd) {
            return EBADF;
        }
        // fdstat: u8 filetype (2 = character device), u16 flags (1 = append), u64 rights x2.
        let mut stat = [0u8; 24];
        stat[0] = 2;
        if fd != 0 {
            stat[2] = 1;
        }
        let rights: u64 = if fd == 0 { 1 << 1 } else { 1 << 6 }; // fd_read / fd_write
        stat[8..16].copy_from_slice(&rights.to_le_bytes());
        errno(write_bytes(&mut c, ret, &stat))
    })?;
    linker.func_wrap(M, "fd_fdstat_set_flags", |_: C<'_>, fd: i32, _: i32| {
        if (0..=2).contains(&fd) {
            SUCCESS
        } else {
            EBADF
        }
    })?;
    linker.func_wrap(
        M,
        "fd_fdstat_set_rights",
        |_: C<'_>, _: i32, _: i64, _: i64| ENOTSUP,
    )?;
    linker.func_wrap(M, "fd_filestat_get", |mut c: C<'_>, fd: i32, ret: i32| {
        if !(0..=2).contains(&fd) {
            return EBADF;
        }
        // filestat: dev, ino, filetype (u8 at 16), nlink, size, atim, mtim, ctim.
        let mut stat = [0u8; 64];
        stat[16] = 2;
        errno(write_bytes(&mut c, ret, &stat))
    })?;
    linker.func_wrap(M, "fd_prestat_get", |_: C<'_>, _: i32, _: i32| EBADF)?;
    linker.func_wrap(
        M,
        "fd_prestat_dir_name",
        |_: C<'_>, _: i32, _: i32, _: i32| EBADF,
    )?;
    linker.func_wrap(M, "fd_seek", |_: C<'_>, _: i32, _: i64, _: i32, _: i32| {
        EBADF
    })?;
    linker.func_wrap(M, "fd_tell", |_: C<'_>, _: i32, _: i32| EBADF)?;
    linker.func_wrap(M, "fd_sync", |_: C<'_>, _: i32| EBADF)?;
    linker.func_wrap(M, "fd_datasync", |_: C<'_>, _: i32| EBADF)?;
    linker.func_wrap(
        M,
        "fd_advise",
        |_: C<'_>, _: i32, _: i64, _: i64, _: i32| EBADF,
    )?;
    linker.func_wrap(M, "fd_allocate", |_: C<'_>, _: i32, _: i64, _: i64| EBADF)?;
    linker.func_wrap(M, "fd_filestat_set_size", |_: C<'_>, _: i32, _: i64| EBADF)?;
    linker.func_wrap(
        M,
        "fd_filestat_set_times",
        |_: C<'_>, _: i32, _: i64, _: i64, _: i32| EBADF,
    )?;
    linker.func_wrap(
        M,
        "fd_pread",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i64, _: i32| EBADF,
    )?;
    linker.func_wrap(
        M,
        "fd_pwrite",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i64, _: i32| EBADF,
    )?;
    linker.func_wrap(
        M,
        "fd_readdir",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i64, _: i32| EBADF,
    )?;
    linker.func_wrap(M, "fd_renumber", |_: C<'_>, _: i32, _: i32| EBADF)?;
    linker.func_wrap(
        M,
        "path_create_directory",
        |_: C<'_>, _: i32, _: i32, _: i32| EBADF,
    )?;
    linker.func_wrap(
        M,
        "path_filestat_get",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32| EBADF,
    )?;
    linker.func_wrap(
        M,
        "path_filestat_set_times",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i64, _: i64, _: i32| EBADF,
    )?;
    linker.func_wrap(
        M,
        "path_link",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| EBADF,
    )?;
    linker.func_wrap(
        M,
        "path_open",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i64, _: i64, _: i32, _: i32| EBADF,
    )?;
    linker.func_wrap(
        M,
        "path_readlink",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| EBADF,
    )?;
    linker.func_wrap(
        M,
        "path_remove_directory",
        |_: C<'_>, _: i32, _: i32, _: i32| EBADF,
    )?;
    linker.func_wrap(
        M,
        "path_rename",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| EBADF,
    )?;
    linker.func_wrap(
        M,
        "path_symlink",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32| EBADF,
    )?;
    linker.func_wrap(M, "path_unlink_file", |_: C<'_>, _: i32, _: i32, _: i32| {
        EBADF
    })?;
    linker.func_wrap(
        M,
        "poll_oneoff",
        |mut c: C<'_>, input: i32, out: i32, nsubs: i32, nevents: i32| {
            // subscription: u64 userdata, u8 tag (0 clock, 1 fd_read, 2 fd_write), ... (48 bytes)
            // event: u64 userdata, u16 error, u8 type, fd_readwrite { u64 nbytes, u16 flags } (32 bytes)
            for i in 0..nsubs.max(0) {
                let Ok(sub) = read_bytes(&c, input + i * 48, 48, 48) else {
                    return EFAULT;
                };
                let mut event = [0u8; 32];
                event[..8].copy_from_slice(&sub[..8]);
                event[10] = sub[8];
                if sub[8] != 0 {
                    event[8..10].copy_from_slice(&(EBADF as u16).to_le_bytes());
                }
                if write_bytes(&mut c, out + i * 32, &event).is_err() {
                    return EFAULT;
                }
            }
            errno(write_u32(&mut c, nevents, nsubs.max(0) as u32))
        },
    )?;
    linker.func_wrap(
        M,
        "proc_exit",
        |_: C<'_>, code: i32| -> wasmtime::Result<()> { Err(wasmtime::Error::new(ProcExit(code))) },
    )?;
    linker.func_wrap(M, "proc_raise", |_: C<'_>, _: i32| ENOTSUP)?;
    linker.func_wrap(M, "sched_yield", |_: C<'_>| SUCCESS)?;
    linker.func_wrap(M, "sock_accept", |_: C<'_>, _: i32, _: i32, _: i32| ENOTSUP)?;
    linker.func_wrap(
        M,
        "sock_recv",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i32| ENOTSUP,
    )?;
    linker.func_wrap(
        M,
        "sock_send",
        |_: C<'_>, _: i32, _: i32, _: i32, _: i32, _: i32| ENOTSUP,
    )?;
    linker.func_wrap(M, "sock_shutdown", |_: C<'_>, _: i32, _: i32| ENOTSUP)?;

    linker.alias_module(M, "wasi_unstable")?;
    Ok(())
}
