//! The API server's request reading on any bytes a client sends: a request within the
//! limits, or the status the server answers, never a panic.
use godwit_vmm::api::{parse_request, Limits};

pub fn check(data: &[u8]) {
    let l = Limits::default();
    match parse_request(data, &l) {
        Ok((_, _, body)) => assert!(body.len() <= l.max_body),
        Err(Some((code, _))) => assert!((400..500).contains(&code)),
        Err(None) => {}
    }
}
