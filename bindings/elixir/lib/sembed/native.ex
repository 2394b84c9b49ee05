defmodule Sembed.Native do
  @moduledoc false
  # The NIF (crates/sembed-nif). `rustler::init!("Elixir.Sembed.Native")` registers the functions
  # below; a plain `@on_load` loading it is all that Hex's `use Rustler` would generate. Every
  # function that runs a model is scheduled on a dirty CPU scheduler by the NIF itself. Call these
  # through `Sembed`, which validates the arguments first.

  @on_load :load_nif

  def load_nif do
    path = :filename.join(:code.priv_dir(:sembed), ~c"native/sembed_nif")

    case :erlang.load_nif(path, 0) do
      :ok ->
        :ok

      {:error, {reason, text}} ->
        require Logger
        Logger.error("sembed: could not load the NIF #{path}.so: #{reason} #{text}")
        {:error, reason}
    end
  end

  defp nif_error, do: :erlang.nif_error(:sembed_nif_not_loaded)

  def load(_refs, _precision, _engine, _max_length), do: nif_error()
  def embed(_model, _texts, _opts), do: nif_error()
  def info(_model), do: nif_error()
  def release_memory(_model), do: nif_error()
  def open_index(_target, _model, _refs, _ann_threshold, _many), do: nif_error()
  def index_info(_index), do: nif_error()
  def search(_index, _query, _k, _lang, _path, _exact, _mode), do: nif_error()
  def panic_for_test, do: nif_error()
end
