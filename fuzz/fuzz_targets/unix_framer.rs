#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| evrhost_fuzz::unix_framer(data));
