//! Foreign functions (`proxy_call_foreign_function`): a registry the embedder fills, shipped
//! with `compress` and `uncompress` in zlib format (as Envoy's foreign.cc).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;

use crate::abi::Status;

/// A foreign function: argument bytes in, result bytes (possibly empty) or a status out.
pub type ForeignFunction = Arc<dyn Fn(&[u8]) -> Result<Vec<u8>, Status> + Send + Sync>;

#[derive(Clone, Default)]
pub struct ForeignFunctions {
    functions: HashMap<String, ForeignFunction>,
}

impl std::fmt::Debug for ForeignFunctions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.functions.keys()).finish()
    }
}

/// Largest output `uncompress` will produce, so a zip bomb cannot exhaust the host.
pub const MAX_UNCOMPRESSED_BYTES: u64 = 64 << 20;

impl ForeignFunctions {
    /// The built-ins: `compress` and `uncompress`.
    pub fn with_builtins() -> ForeignFunctions {
        let mut f = ForeignFunctions::default();
        f.register("compress", Arc::new(compress));
        f.register("uncompress", Arc::new(uncompress));
        f
    }

    pub fn register(&mut self, name: &str, function: ForeignFunction) {
        self.functions.insert(name.to_string(), function);
    }

    pub fn get(&self, name: &str) -> Option<&ForeignFunction> {
        self.functions.get(name)
    }
}

fn compress(input: &[u8]) -> Result<Vec<u8>, Status> {
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    encoder
        .write_all(input)
        .map_err(|_| Status::InternalFailure)?;
    encoder.finish().map_err(|_| Status::InternalFailure)
}

fn uncompress(input: &[u8]) -> Result<Vec<u8>, Status> {
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(input)
        .take(MAX_UNCOMPRESSED_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|_| Status::SerializationFailure)?;
    if out.len() as u64 > MAX_UNCOMPRESSED_BYTES {
        return Err(Status::SerializationFailure);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compress_roundtrips_and_bad_input_is_a_serialization_failure() {
        let f = ForeignFunctions::with_builtins();
        let data = b"hello hello hello hello".repeat(10);
        let packed = (f.get("compress").unwrap())(&data).unwrap();
        assert!(packed.len() < data.len());
        assert_eq!(packed[0], 0x78, "zlib header");
        assert_eq!((f.get("uncompress").unwrap())(&packed).unwrap(), data);
        assert_eq!(
            (f.get("uncompress").unwrap())(b"not zlib"),
            Err(Status::SerializationFailure)
        );
        assert!(f.get("nope").is_none());
    }
}
