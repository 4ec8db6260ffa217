//! Fuzz target: the trigger-mode `descripcion` parser (JSON or Python literal) never panics,
//! whatever the text, and what it accepts is valid JSON. Seed it with rows of an old
//! `database_changes` table.

#![no_main]

use libfuzzer_sys::fuzz_target;
use walbridge::trigger::legacy;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(value) = legacy::parse(text) {
            let json = value.to_json();
            assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok(), "{json}");
        }
    }
});
