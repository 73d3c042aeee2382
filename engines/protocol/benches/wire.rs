//! The engine wire's cost for big values: HMAC-SHA256 and keyed BLAKE3 over 100 MiB, and one signed 100 MiB
//! message from a ROUTER to a DEALER over TCP on 127.0.0.1 (encode, send, receive, verify).
//! Run with `cargo bench -p parallax-engine-protocol`.

use bytes::Bytes;
use parallax_engine_protocol::{Receiver, Sender, Signer, ToEngine};
use std::time::Instant;
use zeromq::{DealerSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

const MIB: usize = 1 << 20;

fn rate(bytes: usize, seconds: f64) -> String {
    format!(
        "{:.0} MiB/s ({:.1} ms)",
        bytes as f64 / MIB as f64 / seconds,
        seconds * 1e3
    )
}

#[tokio::main]
async fn main() {
    let size = 100 * MIB;
    let data = Bytes::from(vec![7u8; size]);
    let signer = Signer::new("a-connection-key");

    let t = Instant::now();
    let signature = signer.sign(&[&data]);
    println!(
        "HMAC-SHA256 of 100 MiB: {}",
        rate(size, t.elapsed().as_secs_f64())
    );
    assert!(!signature.is_empty());
    let t = Instant::now();
    let digest = signer.payload_digest(&data);
    println!(
        "keyed BLAKE3 of 100 MiB (what payloads are hashed with): {}",
        rate(size, t.elapsed().as_secs_f64())
    );
    assert_eq!(digest.len(), 32);

    let big_reads = std::env::var("SMALL_READS").is_err();
    let options = || {
        let mut options = zeromq::SocketOptions::default();
        if big_reads {
            options.read_buffer(128, 4 * MIB, 2);
        }
        options
    };
    println!(
        "read buffer up to {}",
        if big_reads {
            "4 MiB"
        } else {
            "64 KiB (default)"
        }
    );
    let mut router = RouterSocket::with_options(options());
    let endpoint = router
        .bind("tcp://127.0.0.1:0")
        .await
        .expect("bind")
        .to_string();
    let mut dealer = DealerSocket::with_options(options());
    dealer.connect(&endpoint).await.expect("connect");
    dealer.send(ZmqMessage::from("hello")).await.expect("hello");
    let hello = router.recv().await.expect("hello in");
    let identity = hello.into_vec().remove(0);
    let mut sender = Sender::new(signer.clone(), "bench");
    let mut receiver = Receiver::new(signer);
    for round in 0..3 {
        let t = Instant::now();
        let message = ToEngine::MapEnd { task: round };
        let mut frames = vec![identity.clone()];
        frames.extend(sender.encode(&message, vec![data.clone()]));
        let encoded = t.elapsed().as_secs_f64();
        router
            .send(ZmqMessage::try_from(frames).expect("frames"))
            .await
            .expect("send");
        let sent = t.elapsed().as_secs_f64();
        let raw = dealer.recv().await.expect("recv");
        let received = t.elapsed().as_secs_f64();
        let envelope = receiver
            .decode::<ToEngine>(raw.into_vec())
            .expect("verified");
        let total = t.elapsed().as_secs_f64();
        assert_eq!(envelope.buffers[0].len(), size);
        println!(
            "100 MiB message, round {round}: sign {:.1} ms, send {:.1} ms, receive {:.1} ms, verify {:.1} ms; {}",
            encoded * 1e3,
            (sent - encoded) * 1e3,
            (received - sent) * 1e3,
            (total - received) * 1e3,
            rate(size, total)
        );
    }
}
