//! Building outgoing messages (headers, parents, signing) and publishing on IOPub.

use super::wire::{self, Signer, WireMessage};
use bytes::Bytes;
use jupyter_protocol::Header;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use zeromq::ZmqMessage;

pub const PROTOCOL_VERSION: &str = "5.3";

/// A message ready to be signed and sent.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub identities: Vec<Bytes>,
    pub header: Header,
    pub parent_header: Value,
    pub metadata: Value,
    pub content: Value,
}

/// The kernel's side of the Jupyter session: its id and signing key.
#[derive(Clone)]
pub struct Session {
    signer: Signer,
    id: String,
}

impl Session {
    pub fn new(signer: Signer) -> Self {
        Session {
            signer,
            id: uuid::Uuid::new_v4().to_string(),
        }
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    fn header(&self, msg_type: &str) -> Header {
        Header {
            msg_id: uuid::Uuid::new_v4().to_string(),
            username: "parallax".to_owned(),
            session: self.id.clone(),
            date: chrono::Utc::now(),
            msg_type: msg_type.to_owned(),
            version: PROTOCOL_VERSION.to_owned(),
        }
    }

    /// A message whose parent is `parent_header` (an empty object when there is none).
    pub fn message(&self, msg_type: &str, parent_header: &Value, content: Value) -> Outgoing {
        Outgoing {
            identities: Vec::new(),
            header: self.header(msg_type),
            parent_header: if parent_header.is_object() {
                parent_header.clone()
            } else {
                json!({})
            },
            metadata: json!({}),
            content,
        }
    }

    /// A reply to `request`, routed back to the client that sent it.
    pub fn reply(&self, request: &WireMessage, msg_type: &str, content: Value) -> Outgoing {
        let mut out = self.message(msg_type, &request.header, content);
        out.identities = request.identities.clone();
        out
    }

    pub fn encode(&self, out: &Outgoing) -> ZmqMessage {
        wire::encode(
            &self.signer,
            &out.identities,
            &out.header,
            &out.parent_header,
            &out.metadata,
            &out.content,
            &[],
        )
    }
}

/// Where a cell's outputs go: the request they answer.
#[derive(Debug, Clone, Default)]
pub struct OutputRoute {
    pub parent_header: Value,
}

impl OutputRoute {
    pub fn answering(request: &WireMessage) -> Self {
        OutputRoute {
            parent_header: request.header.clone(),
        }
    }
}

/// What IOPub's task is asked to do.
pub enum IopubItem {
    Message(Box<Outgoing>),
    /// Answered once every message queued before it has been sent.
    Flush(oneshot::Sender<()>),
}

/// Publishes on IOPub from any thread; the IOPub socket task does the sending.
#[derive(Clone)]
pub struct Publisher {
    session: Session,
    queue: mpsc::UnboundedSender<IopubItem>,
}

impl Publisher {
    pub fn new(session: Session) -> (Publisher, mpsc::UnboundedReceiver<IopubItem>) {
        let (queue, rx) = mpsc::unbounded_channel();
        (Publisher { session, queue }, rx)
    }

    /// Waits until everything published so far has been sent.
    pub async fn flush(&self) {
        let (done, sent) = oneshot::channel();
        if self.queue.send(IopubItem::Flush(done)).is_ok() {
            let _ = sent.await;
        }
    }

    pub fn publish(&self, route: &OutputRoute, msg_type: &str, content: Value) {
        let mut out = self
            .session
            .message(msg_type, &route.parent_header, content);
        // The topic, as ipykernel sets it; clients subscribe to everything.
        out.identities = vec![Bytes::from(format!(
            "kernel.{}.{msg_type}",
            self.session.id
        ))];
        // Fails only once the IOPub task has stopped, at shutdown, when nobody listens anyway.
        let _ = self.queue.send(IopubItem::Message(Box::new(out)));
    }

    pub fn status(&self, route: &OutputRoute, state: &str) {
        self.publish(route, "status", json!({ "execution_state": state }));
    }

    pub fn stream(&self, route: &OutputRoute, name: &str, text: &str) {
        self.publish(route, "stream", json!({ "name": name, "text": text }));
    }
}

/// Where one cell's output goes: IOPub, answering the request that ran it.
#[derive(Clone)]
pub struct CellOut {
    publisher: Publisher,
    route: OutputRoute,
}

impl CellOut {
    pub fn new(publisher: Publisher, route: OutputRoute) -> Self {
        CellOut { publisher, route }
    }

    pub fn publish(&self, msg_type: &str, content: Value) {
        self.publisher.publish(&self.route, msg_type, content);
    }

    /// Text on stdout or stderr.
    pub fn stream(&self, name: &str, text: &str) {
        self.publisher.stream(&self.route, name, text);
    }

    pub fn stdout(&self, text: &str) {
        self.stream("stdout", text);
    }

    pub fn stderr(&self, text: &str) {
        self.stream("stderr", text);
    }

    /// A block shown under the cell (`update`: redrawn in place) with these MIME `data`.
    pub fn show_in_place(&self, display_id: &str, update: bool, data: Value) {
        let kind = if update {
            "update_display_data"
        } else {
            "display_data"
        };
        self.publish(
            kind,
            json!({"data": data, "metadata": {}, "transient": {"display_id": display_id}}),
        );
    }

    /// Where a running cell's printed output goes.
    pub fn sink(&self) -> parallax_eval::StreamSink {
        let out = self.clone();
        std::sync::Arc::new(move |name, text| out.stream(name, text))
    }
}
