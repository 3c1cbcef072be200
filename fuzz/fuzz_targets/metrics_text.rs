//! Prometheus text from a guest (GetMetrics) or a pod's shim, as the shim and
//! kata-monitor parse it: no panic, and what parses renders to text that
//! parses again to the same families.
#![no_main]

use kata_proto::metrics::Metrics;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = Metrics::parse(text) {
        let again = Metrics::parse(&m.render()).expect("rendered metrics parse");
        assert_eq!(again.len(), m.len());
    }
});
