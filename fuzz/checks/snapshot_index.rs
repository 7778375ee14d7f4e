//! A snapshot's page index as a lazy restore reads it: any file gives an index whose
//! every entry, frame and page read is checked, or a clear refusal, never a panic or an
//! allocation the file chose.
use godwit_migration::snapshot_index::{Found, Index};
use std::io::Write;

pub fn check(data: &[u8]) {
    let path = std::env::temp_dir().join(format!("godwit-fuzz-index-{}", std::process::id()));
    let mut f = std::fs::File::create(&path).expect("scratch file");
    f.write_all(data).expect("scratch file");
    let file = std::fs::File::open(&path).expect("scratch file");
    // Unlinked once open, so that no input leaves a file behind.
    let _ = std::fs::remove_file(&path);
    let Ok(Found::Index(ix)) = Index::open(file) else {
        return;
    };
    let mut buf = Vec::new();
    for &at in ix.control().iter().take(64) {
        let _ = ix.frame_at(at, &mut buf);
    }
    for t in ix.tables().iter().take(8) {
        let mut e = [0u64; 64];
        if ix.entries(t, 0, &mut e).is_ok() {
            for &at in e.iter().filter(|&&a| a != 0).take(16) {
                let _ = ix.frame_at(at, &mut buf);
                // A touch's read: the head, then one page and the run after it.
                if let Ok(Some(p)) = ix.pages_at(at) {
                    let n = p.addrs.len();
                    let k = (at as usize) % n.max(1);
                    let _ = ix.read_pages(&p, k..k + 1, &mut buf);
                    let _ = ix.read_pages(&p, k..n, &mut buf);
                    let _ = ix.read_pages(&p, n..n + 1, &mut buf);
                }
            }
        }
        let _ = ix.entries(t, t.pages.saturating_sub(1), &mut e);
    }
}
