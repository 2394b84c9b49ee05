//! The OpenAPI 3.1 document served at `/openapi.json`, derived (utoipa) from the routes' path
//! annotations and the body types below.
//!
//! The request types describe what the routes accept; the handlers themselves read the JSON field
//! by field (`parse_body`, `opt_str`, …) so that every malformed request gets an error naming the
//! field, in the surface's own error format, which a typed extractor's rejection would not give.

use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};

/// A string or a list of strings (non-empty: an empty string or list is refused with a 4xx).
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum Texts {
    One(String),
    Many(Vec<String>),
}

#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum EncodingFormat {
    Float,
    Base64,
}

#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum InputType {
    Query,
    Document,
}

#[derive(Serialize, Deserialize, ToSchema)]
#[allow(dead_code)]
pub enum TruncationDirection {
    Right,
    Left,
}

/// `POST /v1/embeddings` (OpenAI).
#[derive(Serialize, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct OpenAiEmbeddingsRequest {
    /// The texts (at most `--max-client-batch-size`; no empty strings).
    pub input: Texts,
    /// A served model's name (default: the first).
    pub model: Option<String>,
    /// Matryoshka dimension (models that support it).
    pub dimensions: Option<u32>,
    /// `float` (default) or `base64` (little-endian f32).
    pub encoding_format: Option<EncodingFormat>,
    /// `query` or `document`: the model's prompt or Jina's retrieval adapter.
    pub input_type: Option<InputType>,
}

/// `POST /embed` (TEI).
#[derive(Serialize, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct TeiEmbedRequest {
    pub inputs: Texts,
    pub model: Option<String>,
    pub normalize: Option<bool>,
    /// Cut over-long inputs instead of refusing them.
    pub truncate: Option<bool>,
    /// `Right` (default) or `Left`.
    pub truncation_direction: Option<TruncationDirection>,
    /// A Jina task adapter or a prompt name of the model.
    pub prompt_name: Option<String>,
    pub dimensions: Option<u32>,
}

/// `POST /tokenize` (TEI).
#[derive(Serialize, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct TokenizeRequest {
    pub inputs: Texts,
    pub model: Option<String>,
    pub prompt_name: Option<String>,
    pub truncation_direction: Option<TruncationDirection>,
}

/// One vector: floats, or base64 of little-endian f32.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub enum VectorDoc {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct OpenAiEmbeddingDoc {
    pub object: String,
    pub embedding: VectorDoc,
    pub index: u64,
}

#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct UsageDoc {
    pub prompt_tokens: u64,
    pub total_tokens: u64,
}

/// The answer of `POST /v1/embeddings`.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct OpenAiEmbeddingsResponse {
    pub object: String,
    pub data: Vec<OpenAiEmbeddingDoc>,
    pub model: String,
    pub usage: UsageDoc,
}

/// One model of `GET /v1/models`.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ModelObject {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
}

#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelObject>,
}

#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct OpenAiErrorDetail {
    pub message: String,
    /// `invalid_request_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: String,
}

/// Every error under `/v1/`.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct OpenAiError {
    pub error: OpenAiErrorDetail,
}

/// Every error of the TEI routes.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct TeiError {
    pub error: String,
    pub error_type: String,
}

/// `POST /search` (with `sembed serve --index`): the chunks of the index nearest to a query.
#[derive(Serialize, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct SearchRequest {
    /// What to look for (non-empty); embedded as a query by the index's model.
    pub query: String,
    /// Hits to return, 1 to 1000 (default 10).
    #[schema(minimum = 1, maximum = 1000)]
    pub k: Option<u32>,
    /// Only chunks of this language (`rust`, `python`, `elixir`, `javascript`, `typescript`, `go`,
    /// `java`, `text`; any case). Another name is a 422 listing these.
    pub lang: Option<String>,
    /// Only paths matching this pattern (`*` any characters, `/` included; `?` one).
    pub path: Option<String>,
    /// `hybrid` (default: the dense and BM25 scores fused), `dense` or `lexical`.
    pub mode: Option<String>,
}

/// One chunk found.
#[derive(Serialize, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct SearchHit {
    /// What the hit was ranked by: cosine similarity (dense), BM25 (lexical), or (hybrid) its
    /// cosine over the best cosine plus `lexical_weight` times its BM25 over the best BM25, each
    /// ranking 50 deep (a hit missing from one takes that ranking's lowest), plus `name_weight`
    /// times the share of its symbol's name's words found in the query.
    pub score: f32,
    /// Cosine similarity to the query, where the hit was in the dense ranking.
    pub cosine: Option<f32>,
    /// BM25, where the hit was in the lexical ranking.
    pub bm25: Option<f32>,
    pub path: String,
    pub lang: String,
    /// `function`, `method`, `class`, `module`, `code`, `text`...
    pub kind: String,
    pub symbol: Option<String>,
    pub start_line: u64,
    pub end_line: u64,
    pub start_byte: u64,
    pub end_byte: u64,
    /// Piece `part` of `parts` of a definition split to fit the model.
    pub part: u64,
    pub parts: u64,
    /// SHA-256 of the text (hex).
    pub hash: String,
    pub text: String,
}

#[derive(Serialize, Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct SearchResponse {
    pub query: String,
    /// `hybrid`, `dense` or `lexical`.
    pub mode: String,
    /// Hybrid search: the BM25 ranking's weight in the fusion (0.4, or the one a model fitted by
    /// `sembed adapt` carries).
    pub lexical_weight: Option<f64>,
    /// Hybrid search: the name match's weight in the fusion (0.25, or the one a model fitted by
    /// `sembed adapt` carries).
    pub name_weight: Option<f64>,
    /// How the dense ranking was answered: `exact` (every vector compared) or `ann` (the HNSW
    /// graph); `lexical` when there was none.
    pub method: String,
    pub hits: Vec<SearchHit>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sembed",
        description = "Embeddings over HTTP: OpenAI- and TEI-compatible routes."
    ),
    paths(
        crate::openai_embeddings,
        crate::openai_models,
        crate::openai_model,
        crate::tei_embed,
        crate::tokenize,
        crate::search_route,
        crate::health,
        crate::info,
        crate::metrics_route
    ),
    components(schemas(
        Texts,
        OpenAiEmbeddingsRequest,
        TeiEmbedRequest,
        TokenizeRequest,
        SearchRequest,
        SearchResponse,
        SearchHit,
        OpenAiEmbeddingsResponse,
        ModelList,
        ModelObject,
        OpenAiError,
        TeiError
    ))
)]
pub struct ApiDoc;
