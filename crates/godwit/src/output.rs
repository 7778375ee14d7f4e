//! What godwit writes for people and scripts: its lines on stderr (`say`) and a
//! command's output on stdout (`outln!`). A line goes in one write, so whoever reads
//! it for a line (a script, the demo, the tests, Nova's driver) never finds half of it
//! (stderr is unbuffered, and eprintln! writes each piece of its format on its own). A
//! failed write is dropped: println! and eprintln! panic when nobody reads any more (a
//! manager that went away, `godwit guests list | head -1`), and neither a signal's
//! stop, an exit status nor the processes a command started may depend on a reader.

/// println!, but a reader that went away only loses the rest of the output.
macro_rules! outln {
    () => {
        $crate::output::out("")
    };
    ($($t:tt)*) => {
        $crate::output::out(&format!($($t)*))
    };
}

/// `line` and a newline on stdout.
pub fn out(line: &str) {
    let line = format!("{line}\n");
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), line.as_bytes());
}

/// `text` on stderr as it is (a benchmark's progress, redrawn with a carriage return).
pub fn progress(text: &str) {
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), text.as_bytes());
}

/// "godwit: `what`" on stderr.
pub fn say(what: &str) {
    let line = format!("godwit: {what}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
}
