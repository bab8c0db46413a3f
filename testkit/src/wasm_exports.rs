//! A minimal reader for the export and import sections of a wasm module, so tests can check
//! which ABI marker and callbacks a built filter exports and which host functions it imports
//! without pulling in a wasm parser.

/// Names of everything `bytes` exports (functions, memories, tables, globals), in order.
///
/// Returns what could be read: an empty list when `bytes` is not a wasm module, and the exports
/// read so far when the module is truncated or malformed.
pub fn wasm_exports(bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let _ = read_section(bytes, SECTION_EXPORT, |r| {
        for _ in 0..r.leb()? {
            let name = r.name()?;
            r.byte()?; // kind
            r.leb()?; // index
            out.push(name);
        }
        Some(())
    });
    out
}

/// Everything `bytes` imports, as `module.name` (e.g. `env.proxy_log`,
/// `wasi_snapshot_preview1.fd_write`), in order.
///
/// Returns what could be read, like [`wasm_exports`].
pub fn wasm_imports(bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let _ = read_section(bytes, SECTION_IMPORT, |r| {
        for _ in 0..r.leb()? {
            let module = r.name()?;
            let name = r.name()?;
            match r.byte()? {
                0x00 => {
                    r.leb()?; // type index
                }
                0x01 => {
                    r.byte()?; // reftype
                    r.limits()?;
                }
                0x02 => r.limits()?,
                0x03 => {
                    r.byte()?; // valtype
                    r.byte()?; // mutability
                }
                0x04 => {
                    r.byte()?; // tag attribute
                    r.leb()?; // type index
                }
                _ => return None,
            }
            out.push(format!("{module}.{name}"));
        }
        Some(())
    });
    out
}

const SECTION_IMPORT: u8 = 2;
const SECTION_EXPORT: u8 = 7;

/// Calls `body` with a reader over the contents of the first section with id `id`.
fn read_section(
    bytes: &[u8],
    id: u8,
    mut body: impl FnMut(&mut Reader<'_>) -> Option<()>,
) -> Option<()> {
    if bytes.get(..4)? != b"\0asm" {
        return None;
    }
    let mut r = Reader { bytes, pos: 8 };
    while r.pos < bytes.len() {
        let section = r.byte()?;
        let size = usize::try_from(r.leb()?).ok()?;
        let end = r.pos.checked_add(size)?;
        if section == id {
            let mut inner = Reader {
                bytes: bytes.get(..end)?,
                pos: r.pos,
            };
            return body(&mut inner);
        }
        r.pos = end;
    }
    None
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    /// An unsigned LEB128 value of at most 64 bits.
    fn leb(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn name(&mut self) -> Option<String> {
        let len = usize::try_from(self.leb()?).ok()?;
        let end = self.pos.checked_add(len)?;
        let s = std::str::from_utf8(self.bytes.get(self.pos..end)?).ok()?;
        self.pos = end;
        Some(s.to_owned())
    }

    /// Memory or table limits: flags, minimum and, when flag bit 0 is set, maximum.
    fn limits(&mut self) -> Option<()> {
        let flags = self.byte()?;
        self.leb()?;
        if flags & 1 != 0 {
            self.leb()?;
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A module importing `env.f` (func) and `wasi_unstable.mem` (memory with max),
    /// exporting `run` and `memory`, with an unrelated custom section first.
    fn module() -> Vec<u8> {
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        // custom section "x" with one payload byte
        m.extend([0, 3, 1, b'x', 0xff]);
        // type section: one func type () -> ()
        m.extend([1, 4, 1, 0x60, 0, 0]);
        // import section
        let mut imports = vec![2];
        imports.extend([3, b'e', b'n', b'v', 1, b'f', 0x00, 0]);
        imports.extend(b"\x0dwasi_unstable\x03mem");
        imports.extend([0x02, 0x01, 1, 2]);
        m.push(2);
        m.push(u8::try_from(imports.len()).unwrap());
        m.extend(imports);
        // function section: one function of type 0
        m.extend([3, 2, 1, 0]);
        // export section
        let mut exports = vec![2];
        exports.extend([3, b'r', b'u', b'n', 0x00, 1]);
        exports.extend(b"\x06memory");
        exports.extend([0x02, 0]);
        m.push(7);
        m.push(u8::try_from(exports.len()).unwrap());
        m.extend(exports);
        // code section: one empty body
        m.extend([10, 4, 1, 2, 0, 0x0b]);
        m
    }

    #[test]
    fn reads_exports_and_imports() {
        let m = module();
        assert_eq!(wasm_exports(&m), ["run", "memory"]);
        assert_eq!(wasm_imports(&m), ["env.f", "wasi_unstable.mem"]);
    }

    #[test]
    fn tolerates_garbage() {
        assert!(wasm_exports(b"").is_empty());
        assert!(wasm_exports(b"not wasm at all").is_empty());
        let m = module();
        for cut in 0..m.len() {
            let _ = wasm_exports(&m[..cut]);
            let _ = wasm_imports(&m[..cut]);
        }
    }
}
