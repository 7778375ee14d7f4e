//! What godwit says on stderr, a line at a time. Each line goes in one write, so whoever
//! reads it for a line (a script, the demo, the tests, Nova's driver) never finds half
//! of it (stderr is unbuffered, and eprintln! writes each piece of its format on its
//! own). A failed write is dropped: eprintln! panics when nobody reads stderr any more
//! (a manager that went away, a pipe whose reader exited), and neither a signal's stop
//! nor an exit status may depend on a reader.

/// "godwit: `what`" on stderr.
pub fn say(what: &str) {
    let line = format!("godwit: {what}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
}
