//! The migration stream decoder: any bytes give frames or a clear error, never a panic;
//! a binary frame decoded is one the encoder writes back to the same bytes (JSON-bearing
//! frames may differ in spelling, so only their decoding is checked).
use godwit_migration::wire::{self, Kind};

pub fn check(data: &[u8]) {
    let mut input = data;
    let mut buf = Vec::new();
    for _ in 0..64 {
        let before = input;
        match wire::read_frame(&mut input, &mut buf) {
            Ok(wire::Frame::Pages { section, addrs, .. }) => {
                // Read apart (straight into place), its head says the same.
                let used = before.len() - input.len();
                let h = wire::parse_header(before[..wire::HEADER_LEN].try_into().unwrap())
                    .expect("a decoded frame's header");
                let p = &before[wire::HEADER_LEN..used];
                let head =
                    wire::pages_head_len(p.len(), h.checked).expect("a decoded frame's length");
                let got = wire::decode_pages_head(&p[..head], h.checked).expect("a decoded head");
                assert_eq!(
                    (got.section, got.addrs),
                    (section, addrs),
                    "the head read apart differs"
                );
            }
            Ok(f) => {
                let used = before.len() - input.len();
                if matches!(
                    f.kind(),
                    Kind::Zero
                        | Kind::State
                        | Kind::Data
                        | Kind::Sync
                        | Kind::Synced
                        | Kind::Join
                        | Kind::Postcopy
                        | Kind::Lacks
                ) {
                    let mut again = Vec::new();
                    wire::write_frame(&mut again, &f).expect("a decoded frame encodes");
                    assert_eq!(
                        again,
                        before[..used],
                        "a frame did not re-encode to its bytes"
                    );
                }
            }
            Err(_) => break,
        }
    }
}
