//! The wire codecs a guest feeds the host: the pairs decoder (with the header checks run on
//! whatever it accepts), the property path splitter, and property values built from JSON
//! (route and cluster metadata) with their encoding.
//!
//! Invariants: nothing panics; a map the decoder accepts serializes back to bytes it decodes
//! to the same map; an encoded property map is a map the decoder accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wasmfilter_host::PropertyValue;
use wasmfilter_host::pairs::{self, MapRole};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => {
            if let Ok(fields) = pairs::deserialize(input) {
                let again = pairs::serialize(&fields);
                assert_eq!(pairs::deserialize(&again).as_ref(), Ok(&fields));
                for role in [
                    MapRole::RequestHeaders,
                    MapRole::ResponseHeaders,
                    MapRole::Trailers,
                ] {
                    let _ = pairs::check_fields(role, &fields);
                }
                let _ = fields.byte_size();
                let _ = fields.get_joined("a");
            }
        }
        1 => {
            let path = pairs::property_path(input);
            assert!(path.len() <= input.len() + 1);
        }
        _ => {
            if let Ok(json) = serde_json::from_slice::<serde_json::Value>(input) {
                let value = PropertyValue::from_json(&json);
                let bytes = value.encode();
                if matches!(value, PropertyValue::Map(_)) {
                    let decoded = pairs::deserialize(&bytes);
                    // Only the decoder's own size limits may refuse an encoded map.
                    assert!(
                        !matches!(decoded, Err(pairs::PairsError::Malformed)),
                        "{decoded:?}"
                    );
                }
            }
        }
    }
});
