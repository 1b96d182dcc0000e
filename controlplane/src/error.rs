//! OCI error responses (Distribution spec, "Error Codes"): `{"errors":[{code,message,detail}]}`
//! with the status that goes with each condition.

use hyper::StatusCode;

/// The spec's error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unsupported,
    TooManyRequests,
    Unauthorized,
    Denied,
    /// 503: a service the request needs (the object store) cannot be reached; try again.
    Unavailable,
    /// Only for 5xx answers: the server failed, not the request.
    Unknown,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BlobUnknown => "BLOB_UNKNOWN",
            Code::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            Code::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            Code::DigestInvalid => "DIGEST_INVALID",
            Code::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            Code::ManifestInvalid => "MANIFEST_INVALID",
            Code::ManifestUnknown => "MANIFEST_UNKNOWN",
            Code::NameInvalid => "NAME_INVALID",
            Code::NameUnknown => "NAME_UNKNOWN",
            Code::SizeInvalid => "SIZE_INVALID",
            Code::Unsupported => "UNSUPPORTED",
            Code::TooManyRequests => "TOOMANYREQUESTS",
            Code::Unauthorized => "UNAUTHORIZED",
            Code::Denied => "DENIED",
            Code::Unavailable => "UNAVAILABLE",
            Code::Unknown => "UNKNOWN",
        }
    }
}

/// An error answer: status, code, a message a person can act on, optional JSON detail.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: Code,
    pub message: String,
    pub detail: Option<serde_json::Value>,
    /// Extra headers (e.g. `Range` on a 416 of an upload).
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: Code, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            detail: None,
            headers: Vec::new(),
        }
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> ApiError {
        self.detail = Some(detail);
        self
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> ApiError {
        self.headers.push((name, value));
        self
    }

    /// The same 401 challenging with Basic instead (browsers ask their user for a password only
    /// then; registry clients are challenged with Bearer).
    pub fn basic_challenge(mut self) -> ApiError {
        self.headers.retain(|(name, _)| *name != "www-authenticate");
        self.headers.push((
            "www-authenticate",
            "Basic realm=\"Lighter\", charset=\"UTF-8\"".to_string(),
        ));
        self
    }

    pub fn bad_request(code: Code, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: Code, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    /// A failure of the server itself (disk, I/O). Logged with its cause; the client gets a 500.
    pub fn internal(context: &str, e: impl std::fmt::Display) -> ApiError {
        tracing::error!("{context}: {e}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unknown,
            format!("{context}: internal error, see the registry's log"),
        )
    }

    pub fn body(&self) -> Vec<u8> {
        let mut e = serde_json::json!({"code": self.code.as_str(), "message": self.message});
        if let Some(d) = &self.detail {
            e["detail"] = d.clone();
        }
        serde_json::to_vec(&serde_json::json!({ "errors": [e] })).expect("JSON of JSON values")
    }
}

/// I/O errors inside a handler are the server's fault; a full file system (or quota) is said
/// as such, 507, so operators and clients know that retrying later can work.
impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> Self {
        if matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) {
            tracing::error!("storage full: {e}");
            return ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                Code::Unknown,
                "the registry's storage is full: nothing was stored; retry once space is freed",
            );
        }
        ApiError::internal("storage", e)
    }
}
