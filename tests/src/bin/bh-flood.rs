//! `bh-flood`: sends UDP datagrams from a fixed source port, paced or as fast
//! as the socket allows, for a fixed time; prints what it sent as one JSON line.
//!
//! Used by the kernel data plane tests inside network namespaces they create;
//! the destination is always an address of such a namespace.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

struct Args {
    to: SocketAddr,
    from: SocketAddr,
    /// Packets per second; `None` = as fast as possible.
    rate: Option<u64>,
    duration: Duration,
    size: usize,
}

fn parse() -> Result<Args, String> {
    let mut to = None;
    let mut from = None;
    let mut rate = None;
    let mut duration = Duration::from_secs(1);
    let mut size = 64;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--to" => to = Some(value.parse().map_err(|e| bad(&e))?),
            "--from" => from = Some(value.parse().map_err(|e| bad(&e))?),
            "--rate" if value == "max" => rate = None,
            "--rate" => rate = Some(value.parse().map_err(|e| bad(&e))?),
            "--duration-ms" => {
                duration = Duration::from_millis(value.parse().map_err(|e| bad(&e))?);
            }
            "--size" => size = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(Args {
        to: to.ok_or("--to is required")?,
        from: from.ok_or("--from is required")?,
        rate,
        duration,
        size,
    })
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bh-flood: {e}");
            std::process::exit(2);
        }
    };
    let socket = UdpSocket::bind(args.from).unwrap_or_else(|e| {
        eprintln!("bh-flood: bind {}: {e}", args.from);
        std::process::exit(1);
    });
    let payload = vec![0x42_u8; args.size];
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut errors: u64 = 0;
    loop {
        let now = Instant::now();
        let elapsed = now - start;
        if elapsed >= args.duration {
            break;
        }
        if let Some(rate) = args.rate {
            // Absolute schedule: packet n leaves at n / rate.
            let due = Duration::from_nanos(sent.saturating_mul(1_000_000_000) / rate);
            if due > elapsed {
                std::thread::sleep(
                    due.saturating_sub(elapsed)
                        .min(args.duration.saturating_sub(elapsed)),
                );
                continue;
            }
        }
        match socket.send_to(&payload, args.to) {
            Ok(_) => sent += 1,
            Err(_) => errors += 1,
        }
    }
    let elapsed = start.elapsed();
    #[expect(clippy::print_stdout, reason = "the report")]
    {
        println!(
            "{{\"sent\":{sent},\"errors\":{errors},\"elapsed_ns\":{},\"bytes\":{}}}",
            elapsed.as_nanos(),
            args.size
        );
    }
}
