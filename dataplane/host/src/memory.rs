//! Checked access to guest memory. Every pointer a guest hands us goes through here: a bad
//! pointer or length becomes `INVALID_MEMORY_ACCESS` for the guest, never a host panic.

use wasmtime::{Caller, Memory};

use crate::abi::Status;
use crate::state::VmState;

/// What a hostcall's body can end in besides success: a status for the guest, or a trap that
/// ends the callback (a guest that broke the ABI's rules, or a trap in the guest's allocator).
#[derive(Debug)]
pub(crate) enum HostError {
    Status(Status),
    Trap(wasmtime::Error),
}

impl From<Status> for HostError {
    fn from(s: Status) -> HostError {
        HostError::Status(s)
    }
}

pub(crate) type HostResult<T = ()> = Result<T, HostError>;

/// Turns a hostcall body's result into what wasm sees: a status code, or a trap.
pub(crate) fn finish(result: HostResult) -> wasmtime::Result<i32> {
    match result {
        Ok(()) => Ok(Status::Ok as i32),
        Err(HostError::Status(s)) => Ok(s as i32),
        Err(HostError::Trap(e)) => Err(e),
    }
}

fn memory(caller: &Caller<'_, VmState>) -> Result<Memory, Status> {
    caller.data().memory.ok_or(Status::InvalidMemoryAccess)
}

fn range(ptr: i32, len: i32, size: usize) -> Result<std::ops::Range<usize>, Status> {
    let start = ptr as u32 as usize;
    let len = len as u32 as usize;
    let end = start.checked_add(len).ok_or(Status::InvalidMemoryAccess)?;
    if end > size {
        return Err(Status::InvalidMemoryAccess);
    }
    Ok(start..end)
}

/// Copies `len` bytes at `ptr` out of guest memory. A null pointer with length 0 is empty.
/// A range outside memory is `INVALID_MEMORY_ACCESS` (checked first, as the ABI asks); a
/// range inside it but longer than `max` is `BAD_ARGUMENT`.
pub(crate) fn read_bytes(
    caller: &Caller<'_, VmState>,
    ptr: i32,
    len: i32,
    max: usize,
) -> Result<Vec<u8>, Status> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let mem = memory(caller)?;
    let data = mem.data(caller);
    let r = range(ptr, len, data.len())?;
    if r.len() > max {
        return Err(Status::BadArgument);
    }
    Ok(data[r].to_vec())
}

/// Checks that `len` bytes at `ptr` lie inside guest memory, without copying them; returns
/// the length. For a caller that compares the length with a quota before reading.
pub(crate) fn check_range(
    caller: &Caller<'_, VmState>,
    ptr: i32,
    len: i32,
) -> Result<usize, Status> {
    if len == 0 {
        return Ok(0);
    }
    let size = memory(caller)?.data_size(caller);
    Ok(range(ptr, len, size)?.len())
}

/// Reads a guest string (lossy UTF-8).
pub(crate) fn read_string(
    caller: &Caller<'_, VmState>,
    ptr: i32,
    len: i32,
    max: usize,
) -> Result<String, Status> {
    let bytes = read_bytes(caller, ptr, len, max)?;
    Ok(match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

pub(crate) fn write_bytes(
    caller: &mut Caller<'_, VmState>,
    ptr: i32,
    bytes: &[u8],
) -> Result<(), Status> {
    let mem = memory(caller)?;
    let data = mem.data_mut(caller);
    let r = range(ptr, bytes.len() as i32, data.len())?;
    data[r].copy_from_slice(bytes);
    Ok(())
}

pub(crate) fn write_u32(caller: &mut Caller<'_, VmState>, ptr: i32, v: u32) -> Result<(), Status> {
    write_bytes(caller, ptr, &v.to_le_bytes())
}

pub(crate) fn write_u64(caller: &mut Caller<'_, VmState>, ptr: i32, v: u64) -> Result<(), Status> {
    write_bytes(caller, ptr, &v.to_le_bytes())
}

/// Hands `bytes` to the guest: allocates a block with the guest's allocator, copies the bytes
/// in, and writes its address and length to `ret_ptr_ptr` / `ret_len_ptr`. Empty data is
/// written as 0/0 without allocating. An allocator that returns 0 or a block outside memory
/// gets `INVALID_MEMORY_ACCESS`; a trap inside the allocator ends the callback.
pub(crate) fn copy_out(
    caller: &mut Caller<'_, VmState>,
    bytes: &[u8],
    ret_ptr_ptr: i32,
    ret_len_ptr: i32,
) -> HostResult {
    // Check the output slots before running guest code, so a bad slot costs no allocation.
    {
        let size = memory(caller)?.data_size(&*caller);
        range(ret_ptr_ptr, 4, size)?;
        range(ret_len_ptr, 4, size)?;
    }
    if bytes.is_empty() {
        write_u32(caller, ret_ptr_ptr, 0)?;
        write_u32(caller, ret_len_ptr, 0)?;
        return Ok(());
    }
    let ptr = allocate(caller, bytes.len())?;
    write_bytes(caller, ptr, bytes)?;
    write_u32(caller, ret_ptr_ptr, ptr as u32)?;
    write_u32(caller, ret_len_ptr, bytes.len() as u32)?;
    Ok(())
}

/// Calls the guest allocator re-entrantly. While it runs, only logging and WASI are allowed.
pub(crate) fn allocate(caller: &mut Caller<'_, VmState>, len: usize) -> HostResult<i32> {
    let Some(alloc) = caller.data().allocator.clone() else {
        return Err(Status::InvalidMemoryAccess.into());
    };
    if len > i32::MAX as usize {
        return Err(Status::BadArgument.into());
    }
    let was = std::mem::replace(&mut caller.data_mut().allocating, true);
    let result = alloc.call(&mut *caller, len as i32);
    caller.data_mut().allocating = was;
    let ptr = result.map_err(HostError::Trap)?;
    if ptr == 0 {
        return Err(Status::InvalidMemoryAccess.into());
    }
    let size = memory(caller)?.data_size(&*caller);
    range(ptr, len as i32, size)?;
    Ok(ptr)
}
