//! Frozen backbones: a forward from input embeddings that keeps what its backward needs, and an
//! explicit backward that returns only ∂L/∂(input embeddings). See ../shared/DESIGN.md, decision 2.

pub mod bert;
pub mod gguf;
pub mod gpt2;
pub mod llama;

use candle_core::{Result, Tensor};

/// What a backbone reads besides the embeddings. All [B, S], prompt positions included.
pub struct EncoderInput<'a> {
    /// [B, S, D] word embeddings with the soft prompt in front
    pub embeds: &'a Tensor,
    /// [B, S] u32, 1 for a position to attend to, 0 for padding
    pub attention_mask: &'a Tensor,
    /// [B, S] u32 segment ids (BERT's token types); zeros for the prompt
    pub token_type_ids: &'a Tensor,
}

pub trait Backbone {
    /// The activations one training forward keeps for its backward.
    type Activations;

    fn hidden_size(&self) -> usize;
    /// The longest sequence, prompt included, the model can read.
    fn max_positions(&self) -> usize;
    /// [V, D]: the token embedding table (prompt initialisation reads it).
    fn word_embeddings(&self) -> &Tensor;
    /// ids [B, N] u32 → [B, N, D]
    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        self.word_embeddings()
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, n, self.hidden_size()))
    }
    /// → last hidden state [B, S, D]; keeps nothing.
    fn forward(&self, input: &EncoderInput) -> Result<Tensor>;
    /// → last hidden state [B, S, D] and the activations for `backward`.
    fn forward_train(&self, input: &EncoderInput) -> Result<(Tensor, Self::Activations)>;
    /// d_hidden [B, S, D] → d_embeds [B, S, D]
    fn backward(&self, d_hidden: &Tensor, activations: Self::Activations) -> Result<Tensor>;
}
