#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tidemark_tests::fuzzing::run("agent_config", data);
});
