//! A span stream from a guest (vsock port 10240), as kata-trace-forwarder
//! decodes it, and a debug console's output frames, as kata-ctl exec decodes
//! them: no panic, no frame beyond the bounds, and what decodes converts to
//! the JSON record and OTLP and back without loss.
#![no_main]

use kata_proto::console::FrameReader;
use kata_proto::trace::otlp;
use kata_proto::trace::wire::{self, frame::Body, Record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // the bytes as they are, and behind a good preamble
    let mut framed = wire::PREAMBLE.to_vec();
    framed.extend_from_slice(data);
    for input in [data, &framed[..]] {
        let mut d = wire::Decoder::new();
        // in uneven pieces, as reads return them
        for chunk in input.chunks(7) {
            d.feed(chunk);
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => {
                        if let Some(Body::Span(s)) = f.body {
                            wire::check_span(&s).expect("a decoded span passed the checks");
                            let r = Record::of(&s, "fuzz");
                            assert_eq!(r.to_span().expect("its record converts back"), s);
                            let recs = otlp::records(&otlp::request(std::slice::from_ref(&s), "fuzz"));
                            assert_eq!(recs.len(), 1);
                        }
                    }
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
        }
    }
    let mut r = FrameReader::default();
    r.feed(data);
    while let Ok(Some(_)) = r.next_frame() {}
});
