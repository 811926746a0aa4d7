//! rumqttc's refusals and errors as words a person acts on: reason codes with their MQTT 5
//! numbers, the broker's reason string when it sent one, and what to check.

use rumqttc::v5::mqttbytes::v5 as p5;

/// MQTT 5's number for a PUBACK reason.
pub(super) fn puback_reason_code(reason: p5::PubAckReason) -> u8 {
    use p5::PubAckReason as R;
    match reason {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

/// `NotAuthorized` → `not authorized`: rumqttc's reason code names as words.
pub(super) fn words(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// The reason code's words, and the broker's reason string when it sent one.
pub(super) fn with_reason(code: String, reason: Option<&str>) -> String {
    match reason {
        Some(r) if !r.is_empty() => format!("{code}: {r}"),
        _ => code,
    }
}

/// A SUBACK failure as words with its MQTT 5 reason code.
pub(super) fn subscribe_reason(code: &p5::SubscribeReasonCode) -> String {
    use p5::SubscribeReasonCode as R;
    let number = match code {
        R::Success(q) => *q as u8,
        R::Failure | R::Unspecified => 0x80,
        R::ImplementationSpecific => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicFilterInvalid => 0x8F,
        R::PkidInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::SharedSubscriptionsNotSupported => 0x9E,
        R::SubscriptionIdNotSupported => 0xA1,
        R::WildcardSubscriptionsNotSupported => 0xA2,
    };
    format!("{} (0x{number:02X})", words(&format!("{code:?}")))
}

/// A CONNACK refusal as words with its MQTT 5 reason code, and what to check.
pub(super) fn connect_reason(code: &p5::ConnectReturnCode) -> String {
    use p5::ConnectReturnCode as R;
    let (number, hint) = match code {
        R::BadUserNamePassword => (Some(0x86), "; check mqtt.username and the password"),
        R::NotAuthorized => (
            Some(0x87),
            "; check the broker's ACL for this user and client id",
        ),
        R::ClientIdentifierNotValid => (Some(0x85), "; check mqtt.client_id"),
        R::Banned => (Some(0x8A), ""),
        R::UnsupportedProtocolVersion => (
            Some(0x84),
            "; the broker does not speak MQTT 5: set mqtt.protocol = \"3.1.1\"",
        ),
        R::ServerUnavailable => (Some(0x88), ""),
        R::ServerBusy => (Some(0x89), ""),
        R::QuotaExceeded => (Some(0x97), ""),
        R::ConnectionRateExceeded => (Some(0x9F), ""),
        R::UseAnotherServer => (Some(0x9C), ""),
        R::ServerMoved => (Some(0x9D), ""),
        R::UnspecifiedError => (Some(0x80), ""),
        R::MalformedPacket => (Some(0x81), ""),
        R::ProtocolError => (Some(0x82), ""),
        _ => (None, ""),
    };
    let name = words(&format!("{code:?}"));
    match number {
        Some(n) => format!("{name} (0x{n:02X}){hint}"),
        None => format!("{name}{hint}"),
    }
}

/// A DISCONNECT from the broker as words with its reason code, and what to check.
pub(super) fn disconnect_reason(code: p5::DisconnectReasonCode, reason: Option<&str>) -> String {
    use p5::DisconnectReasonCode as R;
    let hint = match code {
        R::SessionTakenOver => {
            "; another client connected with the same mqtt.client_id (each bridge needs its own)"
        }
        R::NotAuthorized => "; check the broker's ACL for this user and client id",
        R::ReceiveMaximumExceeded => "; the broker sent more than mqtt.receive_maximum",
        _ => "",
    };
    format!(
        "the broker disconnected us: {} (0x{:02X}){hint}",
        with_reason(words(&format!("{code:?}")), reason),
        code as u8
    )
}

pub(super) fn describe_v311(err: &rumqttc::ConnectionError) -> String {
    match err {
        rumqttc::ConnectionError::ConnectionRefused(code) => format!(
            "the broker refused the connection: {}; check mqtt.username, the password and mqtt.client_id",
            words(&format!("{code:?}"))
        ),
        other => other.to_string(),
    }
}

pub(super) fn describe_v5(err: &rumqttc::v5::ConnectionError) -> String {
    use rumqttc::v5::{ConnectionError as C, StateError as S};
    match err {
        C::ConnectionRefused(code) | C::MqttState(S::ConnFail { reason: code }) => {
            format!(
                "the broker refused the connection: {}",
                connect_reason(code)
            )
        }
        C::MqttState(S::ServerDisconnect {
            reason_code,
            reason_string,
        }) => disconnect_reason(*reason_code, reason_string.as_deref()),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_codes_read_as_words_with_their_number() {
        assert_eq!(words("NotAuthorized"), "not authorized");
        assert_eq!(
            subscribe_reason(&p5::SubscribeReasonCode::NotAuthorized),
            "not authorized (0x87)"
        );
        assert!(
            connect_reason(&p5::ConnectReturnCode::BadUserNamePassword)
                .starts_with("bad user name password (0x86); check mqtt.username")
        );
        assert_eq!(
            disconnect_reason(p5::DisconnectReasonCode::SessionTakenOver, None),
            "the broker disconnected us: session taken over (0x8E); another client connected \
             with the same mqtt.client_id (each bridge needs its own)"
        );
    }
}
