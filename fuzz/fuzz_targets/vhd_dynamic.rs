#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tidemark_tests::fuzzing::run("vhd_dynamic", data);
});
