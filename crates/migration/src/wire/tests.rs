//! Tests of the wire format: round trips, the PAGES frame's builder and its head read
//! apart, damage detected, read timeouts inside a frame.

use super::*;

fn roundtrip(f: &Frame) {
    let mut out = Vec::new();
    write_frame(&mut out, f).unwrap();
    let mut buf = Vec::new();
    let got = read_frame(&mut out.as_slice(), &mut buf).unwrap();
    assert_eq!(&got, f);
}

/// An ACCEPT that says nothing is an empty payload, all an older source (which does
/// not ask) takes; one that says post-copy cannot come carries why, cut to 1000
/// characters as an ABORT's text is.
#[test]
fn accept_is_empty_unless_post_copy_cannot_come() {
    let mut out = Vec::new();
    write_frame(&mut out, &Frame::Accept(Accept::default())).unwrap();
    assert_eq!(out.len(), HEADER_LEN);
    let why = Accept {
        no_postcopy: Some("no userfaultfd here".into()),
    };
    roundtrip(&Frame::Accept(why));
    let long = Accept {
        no_postcopy: Some("x".repeat(5000)),
    };
    let mut out = Vec::new();
    write_frame(&mut out, &Frame::Accept(long)).unwrap();
    let mut buf = Vec::new();
    match read_frame(&mut out.as_slice(), &mut buf).unwrap() {
        Frame::Accept(a) => assert_eq!(a.no_postcopy.unwrap().len(), 1000),
        f => panic!("{:?}", f.kind()),
    }
    let mut out = Vec::new();
    write_raw(&mut out, Kind::Accept, b"[1]").unwrap();
    assert!(matches!(
        read_frame(&mut out.as_slice(), &mut buf),
        Err(WireError::Malformed(Kind::Accept, _))
    ));
}

#[test]
fn frames_round_trip() {
    let data = vec![7u8; 2 * PAGE_SIZE];
    roundtrip(&Frame::Pages {
        section: 2,
        addrs: vec![0, 4096 * 9],
        data: &data,
    });
    roundtrip(&Frame::Zero {
        section: 1,
        runs: vec![(0, 3), (1 << 32, 100)],
    });
    roundtrip(&Frame::State {
        section: 3,
        data: b"state",
    });
    roundtrip(&Frame::Data {
        section: 4,
        data: b"bytes of a device",
    });
    roundtrip(&Frame::Ready(Ready {
        restore_ms: 1.5,
        check_ms: 0.25,
        readers_raised: true,
    }));
    roundtrip(&Frame::Join {
        session: 42,
        index: 3,
    });
    roundtrip(&Frame::Abort("no".into()));
    roundtrip(&Frame::Sync(7));
    roundtrip(&Frame::Synced(u64::MAX));
    roundtrip(&Frame::Go);
    roundtrip(&Frame::Postcopy {
        section: 1,
        missing: vec![vec![1, u64::MAX], vec![], vec![7]],
    });
    roundtrip(&Frame::Lacks {
        section: 2,
        regions: vec![
            Lacks::Runs(vec![(0, 3), (1 << 40, u64::MAX)]),
            Lacks::Bitmap(vec![5, 6]),
            Lacks::Runs(vec![]),
            Lacks::Bitmap(vec![]),
        ],
    });
    roundtrip(&Frame::Request {
        section: 0,
        addrs: vec![4096, 1 << 40],
    });
    roundtrip(&Frame::Done(Done::default()));
    roundtrip(&Frame::Ahead {
        section: 2,
        addrs: vec![8192],
    });
    roundtrip(&Frame::Resume {
        session: 9,
        connections: 2,
    });
    roundtrip(&Frame::Resumed);
    roundtrip(&Frame::Released);
    roundtrip(&Frame::End(Totals {
        pages: 5,
        zero_pages: 6,
        data: 7,
    }));
}

/// The head read apart (pages read in place) is the decoder's section and
/// addresses, for every count; what the decoder refuses, the head refuses.
#[test]
fn a_pages_head_read_apart_is_what_the_decoder_reads() {
    for n in 1..=PAGES_PER_FRAME {
        let data = vec![3u8; n * PAGE_SIZE];
        let addrs: Vec<u64> = (0..n as u64).map(|i| (i * 3) << 12).collect();
        let mut b = Vec::new();
        write_frame(
            &mut b,
            &Frame::Pages {
                section: 9,
                addrs: addrs.clone(),
                data: &data,
            },
        )
        .unwrap();
        let p = &b[HEADER_LEN..];
        let head = pages_head_len(p.len(), Checked::All).unwrap();
        assert_eq!(head, 8 + 8 * n);
        let h = decode_pages_head(&p[..head], Checked::All).unwrap();
        assert_eq!((h.section, h.addrs, h.crcs), (9, addrs, vec![]));
    }
    let one = 8 + 8 + PAGE_SIZE;
    for len in [0, 7, 8, 9, one - 1, one + 1, 8 + 65 * (8 + PAGE_SIZE)] {
        assert!(pages_head_len(len, Checked::All).is_err(), "{len}");
    }
    // A count that disagrees with the length.
    let mut p = vec![0u8; 16];
    p[4] = 2;
    assert!(decode_pages_head(&p, Checked::All).is_err());
    assert!(decode(Kind::Pages, &[p, vec![0; PAGE_SIZE]].concat()).is_err());
}

#[test]
fn pages_frame_builder_matches_the_decoder() {
    let mut f = PagesFrame::new();
    f.set_section(5);
    for i in 0..3u64 {
        f.next_slot().fill(i as u8 + 1);
        f.commit(i * 8192);
    }
    // A slot filled but not committed is not sent.
    f.next_slot().fill(0xee);
    let mut out = Vec::new();
    let n = f.flush(&mut out).unwrap();
    assert_eq!(n, out.len());
    assert!(f.is_empty());
    let mut buf = Vec::new();
    match read_frame(&mut out.as_slice(), &mut buf).unwrap() {
        Frame::Pages {
            section,
            addrs,
            data,
        } => {
            assert_eq!(section, 5);
            assert_eq!(addrs, vec![0, 8192, 16384]);
            assert_eq!(data.len(), 3 * PAGE_SIZE);
            assert!(data[..PAGE_SIZE].iter().all(|b| *b == 1));
            assert!(data[2 * PAGE_SIZE..].iter().all(|b| *b == 3));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn damage_is_detected() {
    let mut out = Vec::new();
    write_frame(&mut out, &Frame::Abort("hello".into())).unwrap();
    let mut buf = Vec::new();
    // Flipped payload byte.
    let mut c = out.clone();
    *c.last_mut().unwrap() ^= 1;
    assert!(matches!(
        read_frame(&mut c.as_slice(), &mut buf),
        Err(WireError::BadCrc { .. })
    ));
    // Cut short.
    assert!(matches!(
        read_frame(&mut &out[..out.len() - 1], &mut buf),
        Err(WireError::Truncated)
    ));
    assert!(matches!(
        read_frame(&mut &out[..5], &mut buf),
        Err(WireError::Truncated)
    ));
    assert!(matches!(
        read_frame(&mut &[][..], &mut buf),
        Err(WireError::Closed)
    ));
    // A huge length is refused before anything is allocated.
    let mut c = out.clone();
    c[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        read_frame(&mut c.as_slice(), &mut buf),
        Err(WireError::TooLarge(_))
    ));
    // A count that does not match the length.
    let mut p = 0u32.to_le_bytes().to_vec();
    p.extend_from_slice(&1000u32.to_le_bytes());
    p.extend_from_slice(&[0; 12]);
    let mut c = Vec::new();
    write_raw(&mut c, Kind::Zero, &p).unwrap();
    assert!(matches!(
        read_frame(&mut c.as_slice(), &mut buf),
        Err(WireError::Malformed(Kind::Zero, _))
    ));
    // Post-copy: a request for nothing or too much, a bitmap that claims more
    // words than it has.
    for n in [0usize, MAX_REQUEST + 1] {
        let mut p = 0u32.to_le_bytes().to_vec();
        p.extend_from_slice(&(n as u32).to_le_bytes());
        p.extend(std::iter::repeat_n(0u8, 8 * n));
        let mut c = Vec::new();
        write_raw(&mut c, Kind::Request, &p).unwrap();
        assert!(matches!(
            read_frame(&mut c.as_slice(), &mut buf),
            Err(WireError::Malformed(Kind::Request, _))
        ));
    }
    let mut p = 0u32.to_le_bytes().to_vec();
    p.extend_from_slice(&1u32.to_le_bytes());
    p.extend_from_slice(&u32::MAX.to_le_bytes());
    p.extend_from_slice(&[0; 8]);
    let mut c = Vec::new();
    write_raw(&mut c, Kind::Postcopy, &p).unwrap();
    assert!(matches!(
        read_frame(&mut c.as_slice(), &mut buf),
        Err(WireError::Malformed(Kind::Postcopy, _))
    ));
}

/// Bytes that come in pieces, with a read timeout between them (`None`).
struct Stalling(std::collections::VecDeque<Option<Vec<u8>>>);

impl Read for Stalling {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self.0.pop_front() {
            None => Ok(0),
            Some(None) => Err(io::Error::new(io::ErrorKind::WouldBlock, "timed out")),
            Some(Some(mut bytes)) => {
                let n = bytes.len().min(b.len());
                b[..n].copy_from_slice(&bytes[..n]);
                if n < bytes.len() {
                    self.0.push_front(Some(bytes.split_off(n)));
                }
                Ok(n)
            }
        }
    }
}

#[test]
fn a_timeout_between_frames_is_nothing_yet_but_inside_one_the_frame_waits_on() {
    let mut frames = Vec::new();
    for f in [
        Frame::Accept(Accept::default()),
        Frame::Done(Done::default()),
    ] {
        write_frame(&mut frames, &f).unwrap();
    }
    // The second frame's payload begins after two headers.
    let second = 2 * HEADER_LEN;
    // A stall before the first frame, one in its header, and one in the second's payload.
    let pieces = vec![
        None,
        Some(frames[..5].to_vec()),
        None,
        None,
        Some(frames[5..second + 2].to_vec()),
        None,
        Some(frames[second + 2..].to_vec()),
    ];
    let mut r = Stalling(pieces.into());
    let mut buf = Vec::new();
    let asked = std::cell::Cell::new(0);
    let go_on = || {
        asked.set(asked.get() + 1);
        true
    };
    assert!(matches!(
        read_frame(&mut Between::new(&mut r, &go_on), &mut buf),
        Err(WireError::Timeout)
    ));
    assert!(matches!(
        read_frame(&mut Between::new(&mut r, &go_on), &mut buf),
        Ok(Frame::Accept(_))
    ));
    assert!(matches!(
        read_frame(&mut Between::new(&mut r, &go_on), &mut buf),
        Ok(Frame::Done(_))
    ));
    assert_eq!(asked.get(), 3);
    assert!(matches!(
        read_frame(&mut Between::new(&mut r, &go_on), &mut buf),
        Err(WireError::Closed)
    ));

    // Given up halfway: not a timeout, the stream is cut.
    let pieces = vec![Some(frames[..5].to_vec()), None, Some(frames[5..].to_vec())];
    let mut r = Stalling(pieces.into());
    assert!(matches!(
        read_frame(&mut Between::new(&mut r, || false), &mut buf),
        Err(WireError::Io(_))
    ));
    // A plain read loses the frame there (why the readers with a timeout use the other).
    let pieces = vec![Some(frames[..5].to_vec()), None, Some(frames[5..].to_vec())];
    let mut r = Stalling(pieces.into());
    assert!(matches!(
        read_frame(&mut r, &mut buf),
        Err(WireError::Timeout)
    ));
}

#[test]
fn a_done_from_a_destination_that_never_answers_released_asks_for_nothing_after_it() {
    // As a destination from before RELEASED writes it.
    let old: Done = serde_json::from_str(r#"{"sections":[],"ended":null}"#).unwrap();
    assert!(!old.answer_released);
    let new = Done {
        answer_released: true,
        ..Done::default()
    };
    roundtrip(&Frame::Done(new));
}

/// A PAGES frame whose CRC covers its head (`HEAD_ONLY`): built by the frame builder or
/// as a head for data written apart, it reads as the same frame; a damaged head is
/// caught, damaged data is the transport's to catch; the flag on any other frame, or
/// any other flag, is refused.
#[test]
fn a_crc_over_the_head_only_checks_the_head() {
    let mut f = PagesFrame::new();
    f.set_section(7);
    for i in 0..3u64 {
        f.next_slot().fill(i as u8 + 1);
        f.commit(i * 8192);
    }
    let (buf, r) = f.take(Vec::new(), Checked::Head).unwrap();
    let built = buf[r].to_vec();
    assert_eq!(built[5], HEAD_ONLY);
    let mut apart = pages_head(7, &[0, 8192, 16384], None);
    for i in 0..3u8 {
        apart.extend(std::iter::repeat_n(i + 1, PAGE_SIZE));
    }
    assert_eq!(built, apart);
    let mut b = Vec::new();
    let h = read_header(&mut built.as_slice()).unwrap();
    assert_eq!(h.checked, Checked::Head);
    match read_frame(&mut built.as_slice(), &mut b).unwrap() {
        Frame::Pages {
            section,
            addrs,
            data,
        } => {
            assert_eq!((section, addrs), (7, vec![0, 8192, 16384]));
            assert!(data[PAGE_SIZE..2 * PAGE_SIZE].iter().all(|x| *x == 2));
        }
        other => panic!("{other:?}"),
    }
    // An address damaged: refused.
    let mut c = built.clone();
    c[HEADER_LEN + 9] ^= 1;
    assert!(matches!(
        read_frame(&mut c.as_slice(), &mut b),
        Err(WireError::BadCrc { .. })
    ));
    // Data damaged: read as it came.
    let mut c = built.clone();
    *c.last_mut().unwrap() ^= 1;
    assert!(read_frame(&mut c.as_slice(), &mut b).is_ok());
    // The same frame checked whole catches it.
    let (buf, r) = {
        let mut f = PagesFrame::new();
        f.set_section(7);
        f.next_slot().fill(1);
        f.commit(0);
        f.take(Vec::new(), Checked::All).unwrap()
    };
    let mut c = buf[r].to_vec();
    assert_eq!(c[5], 0);
    *c.last_mut().unwrap() ^= 1;
    assert!(matches!(
        read_frame(&mut c.as_slice(), &mut b),
        Err(WireError::BadCrc { .. })
    ));
    // The flag on another kind, or another flag.
    let mut c = Vec::new();
    write_frame(&mut c, &Frame::Abort("x".into())).unwrap();
    c[5] = HEAD_ONLY;
    assert!(matches!(
        read_frame(&mut c.as_slice(), &mut b),
        Err(WireError::Malformed(Kind::Abort, _))
    ));
    let mut c = built.clone();
    c[5] = HEAD_ONLY | PAGE_CRCS;
    assert!(matches!(
        read_frame(&mut c.as_slice(), &mut b),
        Err(WireError::Malformed(Kind::Pages, _))
    ));
}

/// A PAGES frame whose head carries each page's CRC (`PAGE_CRCS`): the head's own CRC
/// covers them; read whole, a page that fails its CRC fails the frame; read apart, the
/// head says which CRC is whose; lengths of the other layout are refused.
#[test]
fn a_crc_per_page_in_the_head_checks_each_page() {
    let addrs = [0u64, 8192, 1 << 20];
    let pages: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i + 1; PAGE_SIZE]).collect();
    let crcs: Vec<u32> = pages.iter().map(|p| crc32fast::hash(p)).collect();
    let mut f = pages_head(7, &addrs, Some(&crcs));
    assert_eq!(f[5], PAGE_CRCS);
    for p in &pages {
        f.extend_from_slice(p);
    }
    let h = read_header(&mut f.as_slice()).unwrap();
    assert_eq!(h.checked, Checked::Pages);
    let head = pages_head_len(h.len, h.checked).unwrap();
    assert_eq!(head, 8 + 12 * 3);
    let got = decode_pages_head(&f[HEADER_LEN..HEADER_LEN + head], h.checked).unwrap();
    assert_eq!(
        got,
        PagesHead {
            section: 7,
            addrs: addrs.to_vec(),
            crcs: crcs.clone()
        }
    );
    // As the other layouts, its length is not one of pages.
    assert!(pages_head_len(h.len, Checked::All).is_err());
    assert!(pages_head_len(h.len, Checked::Head).is_err());
    let mut b = Vec::new();
    match read_frame(&mut f.as_slice(), &mut b).unwrap() {
        Frame::Pages {
            section,
            addrs: a,
            data,
        } => {
            assert_eq!((section, a), (7, addrs.to_vec()));
            assert_eq!(data, pages.concat());
        }
        other => panic!("{other:?}"),
    }
    // Any byte of a page, of a page's CRC or of an address damaged: refused.
    for at in [
        HEADER_LEN + head + 5,
        HEADER_LEN + head + 2 * PAGE_SIZE + 7,
        f.len() - 1,
        HEADER_LEN + 8 + 24,
        HEADER_LEN + head - 1,
        HEADER_LEN + 9,
    ] {
        let mut c = f.clone();
        c[at] ^= 0x40;
        assert!(
            matches!(
                read_frame(&mut c.as_slice(), &mut b),
                Err(WireError::BadCrc { .. })
            ),
            "{at}"
        );
    }
    // A count that disagrees with the head's length.
    let mut c = f[HEADER_LEN..HEADER_LEN + head].to_vec();
    c[4] = 2;
    assert!(decode_pages_head(&c, Checked::Pages).is_err());
}

/// What a sender counts for a frame whose pages go apart (`pages_frame_len`) is what
/// the head and the pages make on the wire, with each page's CRC or without.
#[test]
fn a_pages_frame_s_length_is_its_head_and_its_pages() {
    let addrs = [0u64, 4096, 65536];
    for (crcs, checked) in [
        (Some(&[1u32, 2, 3][..]), Checked::Pages),
        (None, Checked::Head),
    ] {
        let head = pages_head(2, &addrs, crcs);
        assert_eq!(
            head.len() + addrs.len() * PAGE_SIZE,
            pages_frame_len(addrs.len(), checked)
        );
    }
}
