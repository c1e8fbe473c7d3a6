//! Every entry point on arbitrary bytes: no panic, and the entry points agree with each other.
#![no_main]

use _core::pattern::LabelBuf;
use _core::wire::{error_response, resolve, set_id, Message, QueryView};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let full = Message::parse(data);
    let query = QueryView::parse(data);
    let resolution = resolve(data);
    let mut out = Vec::new();
    let rcode = data.first().map_or(0, |b| u16::from(*b) * 17);
    let response = error_response(data, rcode, &mut out);
    match &full {
        Err(e) => {
            // A malformed message is malformed for every entry point (which may object to
            // something else first, such as QR set for a query).
            let _ = e;
            assert!(query.is_err());
            assert!(resolution.is_err() && response.is_err());
        }
        Ok(m) => {
            if let Ok(q) = &query {
                assert_eq!(m.questions.len(), 1);
                assert!(q.qname.eq_ignore_case(&m.questions[0].name));
                // The hot-path labels equal the presentation text read back and lower-cased.
                let text = q.qname.to_text();
                let back = LabelBuf::from_presentation(text.as_bytes()).expect("own text parses");
                let labels = q.labels();
                assert_eq!(format!("{back:?}"), format!("{labels:?}"));
            }
            if let Ok(r) = &resolution {
                assert!(!r.chain.is_empty() && r.chain.len() <= 17);
            }
            if response.is_ok() {
                let back = Message::parse(&out).expect("our response parses");
                assert_eq!(back.header.id, m.header.id);
                assert_eq!(back.rcode(), rcode);
            }
        }
    }
    let mut copy = data.to_vec();
    if set_id(&mut copy, 0xabcd).is_ok() {
        assert_eq!(&copy[2..], &data[2..]);
    }
});
