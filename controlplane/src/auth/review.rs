//! Kubernetes ServiceAccount tokens, checked with the TokenReview API
//! (`authentication.k8s.io/v1`) of the cluster Lighter runs in. The request and answer types
//! are k8s-openapi's; the call is one HTTPS POST with the client the mirror already uses
//! (reqwest + rustls), which keeps kube's client stack (tower, its own hyper client) out of the
//! build for a single endpoint.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview as Review, TokenReviewSpec};
use lighter_access::{AuthConfig, Identity};

/// Time the API server has to answer a review.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer read.
const ANSWER_MAX_BYTES: usize = 1 << 20;

pub struct TokenReview {
    http: reqwest::Client,
    url: String,
    token_file: PathBuf,
}

impl TokenReview {
    pub fn new(a: &AuthConfig) -> Result<TokenReview, String> {
        let mut builder = reqwest::Client::builder()
            .timeout(REVIEW_TIMEOUT)
            .connect_timeout(REVIEW_TIMEOUT);
        match std::fs::read(&a.kubernetes_ca_file) {
            Ok(pem) => {
                for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                    format!("auth.kubernetes_ca_file {}: {e}", a.kubernetes_ca_file.display())
                })? {
                    builder = builder.add_root_certificate(cert);
                }
            }
            Err(e) => {
                return Err(format!(
                    "auth.kubernetes_token_review needs the cluster's CA (auth.kubernetes_ca_file {}): {e}",
                    a.kubernetes_ca_file.display()
                ))
            }
        }
        Ok(TokenReview {
            http: builder
                .build()
                .map_err(|e| format!("TokenReview client: {e}"))?,
            url: format!(
                "{}/apis/authentication.k8s.io/v1/tokenreviews",
                a.kubernetes_api_url.trim_end_matches('/')
            ),
            token_file: a.kubernetes_token_file.clone(),
        })
    }

    /// Who `token` belongs to, if the API server vouches for it.
    pub async fn review(&self, token: &str) -> Result<Identity, String> {
        let own = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|e| format!("cannot read {}: {e}", self.token_file.display()))?;
        let review = Review {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut body = serde_json::to_value(&review).expect("JSON of a TokenReview");
        body["apiVersion"] = "authentication.k8s.io/v1".into();
        body["kind"] = "TokenReview".into();
        let answer = self
            .http
            .post(&self.url)
            .bearer_auth(own.trim())
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).expect("JSON"))
            .send()
            .await
            .map_err(|e| {
                tracing::warn!("TokenReview failed: {e}");
                "the Kubernetes API could not be asked".to_string()
            })?;
        let status = answer.status();
        let bytes = answer.bytes().await.map_err(|e| e.to_string())?;
        if !status.is_success() || bytes.len() > ANSWER_MAX_BYTES {
            tracing::warn!(%status, "TokenReview refused: is Lighter's ServiceAccount bound to system:auth-delegator?");
            return Err(format!("the Kubernetes API answered {status}"));
        }
        let review: Review =
            serde_json::from_slice(&bytes).map_err(|e| format!("TokenReview answer: {e}"))?;
        let s = review.status.unwrap_or_default();
        match (s.authenticated, s.user) {
            (Some(true), Some(user)) => Ok(Identity {
                user: user.username.unwrap_or_default(),
                groups: user.groups.unwrap_or_default(),
            }),
            _ => Err(s.error.unwrap_or_else(|| "not authenticated".into())),
        }
    }
}
