defmodule Sembed do
  @moduledoc """
  sembed in-process: load an embedding model once, embed texts on the BEAM's dirty CPU schedulers,
  search code indexes built by `sembed index`.

      {:ok, model} = Sembed.load()                       # all-MiniLM-L6-v2, fetched on first use
      {:ok, v} = Sembed.embed(model, "fn main() {}")     # 384 little-endian f32, unit length
      Nx.from_binary(v, :f32)                            # with Nx, no copy through lists
      Sembed.to_list(v)                                  # without it

  What can be loaded is what `sembed embed -m` takes: a Hugging Face model folder, `hf:ORG/NAME`,
  a fusion `.toml` (the 2560-d Qodo-Embed-1 ⊕ jina-embeddings-v3 unit vector), or fusion parts as
  a keyword list. A model is a resource of the NIF: it is freed when no process holds it any more.

  Every call that runs a model (`load/2`, `embed/3`, `open_index/2`, `search/3`) runs on a dirty CPU
  scheduler, never on a normal one. Errors found while running (a missing folder, a corrupt
  safetensors file, a text that is not UTF-8, a panic inside the engine) come back as
  `{:error, %Sembed.Error{}}`; arguments of the wrong shape (not a binary, an empty list, an unknown
  option) raise `ArgumentError` naming what is wrong. To share forward passes among many callers,
  start a `Sembed.Serving`.
  """

  alias Sembed.{Error, Native}

  defmodule Model do
    @moduledoc """
    A loaded model. `:resource` is the NIF's handle; the other fields describe it: `:dimension` of
    its vectors, `:max_length` in tokens, the `:engine` and `:kernels` that run it (e.g.
    `"fast-f32"` on `"avx512-bf16"`), its `:precision`, its Jina `:tasks`, and the number of
    `:models` (2 for a fusion).
    """
    @enforce_keys [:resource]
    defstruct [
      :resource,
      :name,
      :dimension,
      :max_length,
      :engine,
      :engine_reasons,
      :precision,
      :kernels,
      :tasks,
      :models
    ]

    @type t :: %__MODULE__{
            resource: reference(),
            name: String.t(),
            dimension: pos_integer(),
            max_length: pos_integer(),
            engine: String.t(),
            engine_reasons: [String.t()],
            precision: String.t(),
            kernels: String.t(),
            tasks: [String.t()],
            models: pos_integer()
          }

    defimpl Inspect do
      def inspect(m, _opts) do
        "#Sembed.Model<#{m.name}, #{m.dimension}-d, #{m.engine} on #{m.kernels}>"
      end
    end
  end

  defmodule Index do
    @moduledoc """
    An index built by `sembed index` (a SQLite file or a `postgres://…` table), opened for
    searching, and the `Sembed.Model` that embeds its queries.
    """
    @enforce_keys [:resource, :model]
    defstruct [:resource, :model, :target, :model_identity, :model_refs, :dimension, :chunker, :rows]

    @type t :: %__MODULE__{
            resource: reference(),
            model: Sembed.Model.t(),
            target: String.t(),
            model_identity: String.t(),
            model_refs: [String.t()],
            dimension: pos_integer(),
            chunker: String.t(),
            rows: non_neg_integer()
          }
  end

  @typedoc "A vector: little-endian f32 values, `Nx.from_binary(v, :f32)` reads it."
  @type vector :: binary()

  @typedoc """
  What to load: `:default` (all-MiniLM-L6-v2), a folder, `"hf:ORG/NAME"`, a fusion `.toml`, or
  fusion parts as `[qodo: ref, jina: ref]` / `["qodo=REF", "jina=REF"]`.
  """
  @type model_ref :: :default | String.t() | [String.t()] | keyword(String.t())

  @type precision :: :f32 | :bf16 | :f16 | :int8

  @precisions [:f32, :bf16, :f16, :int8]
  @engines [:auto, :fast, :candle]

  @doc """
  Load a model.

  Options:

    * `:precision` — `:f32` (default), `:bf16` (bf16 arithmetic where the CPU has AMX or
      AVX-512 BF16), `:f16` (candle), or `:int8` (quantised weights on the fast engine);
    * `:engine` — `:auto` (default: the fast engine where it covers the model), `:fast`, `:candle`;
    * `:max_length` — the token limit of every call that gives none (at most the model's).

  Returns `{:ok, %Sembed.Model{}}` or `{:error, %Sembed.Error{reason: :load}}`.
  """
  @spec load(model_ref(), keyword()) :: {:ok, Model.t()} | {:error, Error.t()}
  def load(ref \\ :default, opts \\ []) do
    opts = Keyword.validate!(opts, precision: :f32, engine: :auto, max_length: nil)
    refs = refs!(ref)
    precision = member!(opts[:precision], @precisions, :precision)
    engine = member!(opts[:engine], @engines, :engine)
    max_length = pos_int_or_nil!(opts[:max_length], :max_length)

    with {:ok, resource} <-
           wrap(Native.load(refs, Atom.to_string(precision), Atom.to_string(engine), max_length), :load) do
      model_info(resource)
    end
  end

  @doc "Like `load/2`, raising `Sembed.Error` on failure."
  @spec load!(model_ref(), keyword()) :: Model.t()
  def load!(ref \\ :default, opts \\ []), do: bang(load(ref, opts))

  @doc """
  Embed one text (answered with one vector) or a non-empty list of texts (answered with a list of
  vectors in the same order).

  Options:

    * `:input_type` — `:query` or `:document`: picks the model's query prompt (Qwen3, Qodo) or
      Jina's `retrieval.query` / `retrieval.passage` adapter; default none;
    * `:task` — a Jina task adapter (`"retrieval.query"`, `"text-matching"`, …) or a prompt name;
    * `:dimensions` — Matryoshka truncation (models that support it), renormalised;
    * `:normalize` — unit vectors (default `true`); `false` gives the raw pooled vectors;
    * `:truncate` — cut texts over the limit (default `true`); `false` makes them an error;
    * `:max_length` — token limit of this call; `:batch_size` — texts per forward pass (32).
  """
  @spec embed(Model.t(), String.t() | [String.t()], keyword()) ::
          {:ok, vector() | [vector()]} | {:error, Error.t()}
  def embed(model, input, opts \\ [])

  def embed(%Model{resource: resource}, input, opts) do
    {texts, single?} = texts!(input, "Sembed.embed/3")

    with {:ok, vectors} <- wrap(Native.embed(resource, texts, embed_opts!(opts)), :embed) do
      {:ok, if(single?, do: hd(vectors), else: vectors)}
    end
  end

  def embed(other, _input, _opts) do
    raise ArgumentError, "Sembed.embed/3: expected a %Sembed.Model{}, got: #{inspect(other)}"
  end

  @doc "Like `embed/3`, raising `Sembed.Error` on failure."
  @spec embed!(Model.t(), String.t() | [String.t()], keyword()) :: vector() | [vector()]
  def embed!(model, input, opts \\ []), do: bang(embed(model, input, opts))

  @doc "A vector's values as a list of floats."
  @spec to_list(vector()) :: [float()]
  def to_list(vector) when is_binary(vector) and rem(byte_size(vector), 4) == 0 do
    for <<x::float-32-little <- vector>>, do: x
  end

  @doc "Give back the scratch memory the engine keeps between calls (the weights stay)."
  @spec release_memory(Model.t()) :: :ok | {:error, Error.t()}
  def release_memory(%Model{resource: r}) do
    with {:ok, :ok} <- wrap(Native.release_memory(r), :embed), do: :ok
  end

  @doc """
  Open an index built by `sembed index` for searching: a SQLite file or
  `postgres://USER@HOST:PORT/DB[#TABLE]`.

  Options: `:model` — a loaded `Sembed.Model` to embed the queries with (it must be the model the
  index was built with; sharing it with your embedding calls saves loading it twice); else
  `:models` — references to load (default: the ones the index recorded, in the precision its
  vectors were made in); `:ann_threshold` — above this many rows the HNSW graph answers
  (default sembed's). An opened SQLite index keeps its rows' terms in memory (up to 250,000 rows;
  0.5 s and 19 MB to read at 24,527 chunks), so its BM25 ranking takes a millisecond instead of
  FTS5's 17 ms on long queries: open it once and search it many times.
  """
  @spec open_index(String.t(), keyword()) :: {:ok, Index.t()} | {:error, Error.t()}
  def open_index(target, opts \\ []) when is_binary(target), do: open(target, opts, true)

  # `many`: the index will answer many searches (an opened `Sembed.Index`), not one (`search/3`
  # with a target), so reading its rows' terms into memory pays off.
  defp open(target, opts, many) do
    opts = Keyword.validate!(opts, model: nil, models: [], ann_threshold: nil)

    model_resource =
      case opts[:model] do
        nil ->
          nil

        %Model{resource: r} ->
          r

        other ->
          raise ArgumentError, "Sembed.open_index/2: :model must be a %Sembed.Model{}, got: #{inspect(other)}"
      end

    refs = if opts[:models] == [], do: [], else: refs!(opts[:models])
    ann = pos_int_or_nil!(opts[:ann_threshold], :ann_threshold)

    with {:ok, {index, model}} <- wrap(Native.open_index(target, model_resource, refs, ann, many), :index),
         {:ok, info} <- wrap(Native.index_info(index), :index) do
      model =
        case opts[:model] do
          %Model{} = m -> {:ok, m}
          nil -> model_info(model)
        end

      with {:ok, model} <- model do
        {:ok,
         %Index{
           resource: index,
           model: model,
           target: info.target,
           model_identity: info.model,
           model_refs: info.model_refs,
           dimension: info.dimension,
           chunker: info.chunker,
           rows: info.rows
         }}
      end
    end
  end

  @doc """
  The `:k` (default 10) best chunks for `query`, best first, each a map with `:score` (what it was
  ranked by), `:cosine` and `:bm25` (`nil` where the hit was not in that ranking), `:path`, `:lang`,
  `:kind`, `:symbol`, `:start_line`, `:end_line`, `:text` and the rest of what `sembed search --json`
  prints. `index` is an opened `Sembed.Index` (open it once) or a target, opened for this call.
  Options: `:k`, `:mode` (`:hybrid`, the default: the dense and the BM25 rankings' scores fused;
  `:dense`; `:lexical`), `:lang` (e.g. `"elixir"`), `:path` (a glob such as `"lib/**"`),
  `:exact` (scan every vector instead of the HNSW graph).
  """
  @spec search(Index.t() | String.t(), String.t(), keyword()) ::
          {:ok, [map()]} | {:error, Error.t()}
  def search(index, query, opts \\ [])

  def search(target, query, opts) when is_binary(target) do
    with {:ok, index} <- open(target, [], false), do: search(index, query, opts)
  end

  def search(%Index{resource: r}, query, opts) when is_binary(query) do
    opts = Keyword.validate!(opts, k: 10, lang: nil, path: nil, exact: false, mode: :hybrid)

    k =
      pos_int_or_nil!(opts[:k], :k) || raise(ArgumentError, "option :k must be a positive integer, got: nil")

    lang = string_or_nil!(opts[:lang], :lang)
    path = string_or_nil!(opts[:path], :path)
    exact = bool!(opts[:exact], :exact)

    mode =
      case opts[:mode] do
        m when m in [:hybrid, :dense, :lexical] ->
          Atom.to_string(m)

        other ->
          raise ArgumentError,
                "option :mode must be :hybrid, :dense or :lexical, got: #{inspect(other)}"
      end

    wrap(Native.search(r, query, k, lang, path, exact, mode), :search)
  end

  def search(index, query, _opts) do
    raise ArgumentError,
          "Sembed.search/3: expected an index and a query (binary), got: #{inspect(index)}, #{inspect(query)}"
  end

  @doc false
  # Panics inside the NIF on purpose: the tests show it comes back as an error and the VM lives.
  def __panic_for_test__, do: wrap(Native.panic_for_test(), :embed)

  ## Helpers

  @doc false
  # What `embed/3` and `Sembed.Serving.embed/3` take: one text, or a non-empty list of texts, as
  # `{texts, single?}`. Anything else raises, naming `fun`, the function the caller wrote.
  def texts!(input, fun) do
    texts =
      case input do
        t when is_binary(t) ->
          [t]

        [_ | _] = ts ->
          ts

        [] ->
          raise ArgumentError, "#{fun}: the list of texts is empty"

        other ->
          raise ArgumentError, "#{fun}: expected a text (binary) or a list of texts, got: #{inspect(other)}"
      end

    Enum.each(texts, fn t ->
      is_binary(t) || raise ArgumentError, "#{fun}: every text must be a binary, got: #{inspect(t)}"
    end)

    {texts, is_binary(input)}
  end

  @doc false
  def embed_opts!(opts) do
    opts =
      Keyword.validate!(opts,
        input_type: nil,
        task: nil,
        dimensions: nil,
        normalize: true,
        truncate: true,
        max_length: nil,
        batch_size: 32
      )

    input_type =
      case opts[:input_type] do
        nil ->
          nil

        t when t in [:query, :document] ->
          Atom.to_string(t)

        other ->
          raise ArgumentError, "option :input_type must be :query, :document or nil, got: #{inspect(other)}"
      end

    %{
      input_type: input_type,
      task: string_or_nil!(opts[:task], :task),
      dimensions: pos_int_or_nil!(opts[:dimensions], :dimensions),
      normalize: bool!(opts[:normalize], :normalize),
      truncate: bool!(opts[:truncate], :truncate),
      max_length: pos_int_or_nil!(opts[:max_length], :max_length),
      batch_size: pos_int_or_nil!(opts[:batch_size], :batch_size) || 32
    }
  end

  defp model_info(resource) do
    with {:ok, i} <- wrap(Native.info(resource), :load) do
      {:ok,
       %Model{
         resource: resource,
         name: i.name,
         dimension: i.dimension,
         max_length: i.max_length,
         engine: i.engine,
         engine_reasons: i.engine_reasons,
         precision: i.precision,
         kernels: i.kernels,
         tasks: i.tasks,
         models: i.models
       }}
    end
  end

  defp refs!(:default), do: []
  defp refs!(nil), do: []
  defp refs!(ref) when is_binary(ref) and ref != "", do: [ref]

  defp refs!([_ | _] = list) do
    Enum.map(list, fn
      {name, ref} when is_atom(name) and is_binary(ref) -> "#{name}=#{ref}"
      ref when is_binary(ref) and ref != "" -> ref
      other -> raise ArgumentError, "model reference: expected a string or NAME: REF, got: #{inspect(other)}"
    end)
  end

  defp refs!(other) do
    raise ArgumentError,
          "model reference: expected :default, a folder, \"hf:ORG/NAME\", a .toml or fusion parts, got: #{inspect(other)}"
  end

  defp member!(v, allowed, key) do
    if v in allowed,
      do: v,
      else:
        raise(ArgumentError, "option #{inspect(key)} must be one of #{inspect(allowed)}, got: #{inspect(v)}")
  end

  defp pos_int_or_nil!(nil, _), do: nil
  defp pos_int_or_nil!(n, _) when is_integer(n) and n > 0, do: n

  defp pos_int_or_nil!(v, key),
    do: raise(ArgumentError, "option #{inspect(key)} must be a positive integer, got: #{inspect(v)}")

  defp string_or_nil!(nil, _), do: nil
  defp string_or_nil!(s, _) when is_binary(s), do: s
  defp string_or_nil!(a, _) when is_atom(a), do: Atom.to_string(a)

  defp string_or_nil!(v, key),
    do: raise(ArgumentError, "option #{inspect(key)} must be a string, got: #{inspect(v)}")

  defp bool!(b, _) when is_boolean(b), do: b

  defp bool!(v, key),
    do: raise(ArgumentError, "option #{inspect(key)} must be true or false, got: #{inspect(v)}")

  defp wrap({:ok, v}, _), do: {:ok, v}
  defp wrap({:error, msg}, reason) when is_binary(msg), do: {:error, Error.wrap(reason, msg)}

  defp bang({:ok, v}), do: v
  defp bang({:error, %Error{} = e}), do: raise(e)
end
