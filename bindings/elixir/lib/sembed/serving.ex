defmodule Sembed.Serving do
  @moduledoc """
  A supervised process that batches concurrent callers into shared forward passes, as
  `Nx.Serving.batched_run/2` does: a hundred processes calling `embed/3` at once share a few
  forward passes of `:batch_size` texts instead of running a hundred.

      children = [
        {Sembed.Serving,
         name: MyApp.Embedder, model: "fusion.toml", batch_size: 32, batch_timeout: 10}
      ]
      Supervisor.start_link(children, strategy: :one_for_one)

      {:ok, v} = Sembed.Serving.embed(MyApp.Embedder, "def hello, do: :world", input_type: :document)

  Options of `start_link/1`:

    * `:name` — the name callers use (required for a child of a supervision tree);
    * `:model` — a loaded `%Sembed.Model{}`, or what `Sembed.load/2` takes (loaded when the
      process starts, with `:load_options`);
    * `:batch_size` — texts per forward pass (default 32): a batch runs as soon as it is full;
    * `:batch_timeout` — milliseconds to wait for more callers after the first (default 10);
    * `:backlog_batches` — when more callers wait than one batch holds, up to this many batches of
      them (default 4) go to the engine together, which orders their texts by length before
      cutting forward passes of `:batch_size` (less padding; `1` gives strict arrival-order
      batches);
    * `:embed_options` — defaults for every call (`:normalize`, `:truncate`, `:max_length`, …).

  Callers whose options differ (say `:query` and `:document`) are batched apart. One batch runs at
  a time, in a process of its own on a dirty CPU scheduler (the engine uses every core for it);
  the serving keeps taking callers meanwhile. A batch that fails answers each of its callers with
  the error; the serving goes on.
  """

  use GenServer

  alias Sembed.Error

  @type server :: GenServer.server()

  @doc "Start the serving (see the module documentation for the options)."
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts) do
    {gen_opts, opts} = Keyword.split(opts, [:name])
    GenServer.start_link(__MODULE__, opts, gen_opts)
  end

  @doc """
  Embed one text (one vector back) or a list of texts (a list back) in the serving's next batch.
  Options: those of `Sembed.embed/3` that are not fixed by the batch (`:input_type`, `:task`,
  `:dimensions`, `:normalize`, `:truncate`, `:max_length`) and `:timeout` (milliseconds, default
  `:infinity`).
  """
  @spec embed(server(), String.t() | [String.t()], keyword()) ::
          {:ok, Sembed.vector() | [Sembed.vector()]} | {:error, Error.t()}
  def embed(server, input, opts \\ []) do
    {timeout, opts} = Keyword.pop(opts, :timeout, :infinity)

    {texts, single?} = Sembed.texts!(input, "Sembed.Serving.embed/3")

    if Keyword.has_key?(opts, :batch_size) do
      raise ArgumentError, "Sembed.Serving.embed/3: :batch_size is the serving's, set it in start_link/1"
    end

    # Validated here, in the caller, so a bad option raises where it was written.
    _ = Sembed.embed_opts!(opts)

    try do
      GenServer.call(server, {:embed, texts, single?, Enum.sort(opts)}, timeout)
    catch
      :exit, {:timeout, _} ->
        {:error, %Error{reason: :timeout, message: "Sembed.Serving: no answer within #{timeout} ms"}}

      :exit, {reason, _} when reason in [:noproc, :normal, :shutdown] ->
        {:error, %Error{reason: :down, message: "Sembed.Serving #{inspect(server)} is not running"}}
    end
  end

  @doc "The serving's model."
  @spec model(server()) :: Sembed.Model.t()
  def model(server), do: GenServer.call(server, :model)

  @doc "Batches run and texts embedded so far: `%{batches: n, texts: n}`."
  @spec stats(server()) :: %{batches: non_neg_integer(), texts: non_neg_integer()}
  def stats(server), do: GenServer.call(server, :stats)

  ## Server

  @impl true
  def init(opts) do
    opts =
      Keyword.validate!(opts,
        model: :default,
        load_options: [],
        batch_size: 32,
        batch_timeout: 10,
        backlog_batches: 4,
        embed_options: []
      )

    batch_size = opts[:batch_size]
    timeout = opts[:batch_timeout]

    unless is_integer(batch_size) and batch_size > 0,
      do:
        raise(
          ArgumentError,
          "Sembed.Serving: :batch_size must be a positive integer, got: #{inspect(batch_size)}"
        )

    unless is_integer(timeout) and timeout >= 0,
      do:
        raise(
          ArgumentError,
          "Sembed.Serving: :batch_timeout must be a non-negative integer, got: #{inspect(timeout)}"
        )

    _ = Sembed.embed_opts!(opts[:embed_options])

    model =
      case opts[:model] do
        %Sembed.Model{} = m -> {:ok, m}
        ref -> Sembed.load(ref, opts[:load_options])
      end

    case model do
      {:ok, model} ->
        {:ok,
         %{
           model: model,
           batch_size: batch_size,
           batch_timeout: timeout,
           backlog_batches: backlog_batches!(opts[:backlog_batches]),
           defaults: opts[:embed_options],
           # options => {texts waiting, [{from, texts, single?}] newest first}
           pending: %{},
           timers: %{},
           ready: [],
           running: nil,
           batches: 0,
           texts: 0
         }}

      {:error, e} ->
        {:stop, e}
    end
  end

  @impl true
  def handle_call({:embed, texts, single?, opts}, from, s) do
    {n, entries} = Map.get(s.pending, opts, {0, []})
    n = n + length(texts)
    s = %{s | pending: Map.put(s.pending, opts, {n, [{from, texts, single?} | entries]})}

    s =
      cond do
        n >= s.batch_size -> mark_ready(s, opts)
        Map.has_key?(s.timers, opts) -> s
        true -> start_timer(s, opts)
      end

    {:noreply, run_next(s)}
  end

  def handle_call(:model, _from, s), do: {:reply, s.model, s}
  def handle_call(:stats, _from, s), do: {:reply, %{batches: s.batches, texts: s.texts}, s}

  @impl true
  def handle_info({:batch_timeout, opts, ref}, s) do
    case s.timers do
      %{^opts => ^ref} ->
        {:noreply, s |> Map.update!(:timers, &Map.delete(&1, opts)) |> mark_ready(opts) |> run_next()}

      _ ->
        {:noreply, s}
    end
  end

  def handle_info({:DOWN, mref, :process, _pid, reason}, %{running: {mref, entries}} = s) do
    result =
      case reason do
        {:sembed_batch, result} ->
          result

        other ->
          {:error,
           %Error{reason: :panic, message: "Sembed.Serving: the batch process died: #{inspect(other)}"}}
      end

    reply_all(entries, result)
    {:noreply, run_next(%{s | running: nil, batches: s.batches + 1, texts: s.texts + count(entries)})}
  end

  def handle_info(_msg, s), do: {:noreply, s}

  defp start_timer(s, opts) do
    ref = make_ref()
    Process.send_after(self(), {:batch_timeout, opts, ref}, s.batch_timeout)
    %{s | timers: Map.put(s.timers, opts, ref)}
  end

  defp mark_ready(s, opts) do
    if opts in s.ready, do: s, else: %{s | ready: s.ready ++ [opts]}
  end

  # Start the first ready batch unless one is running: callers in arrival order, whole callers,
  # up to :batch_size texts (at least one caller, however many texts it brought).
  defp run_next(%{running: nil, ready: [opts | rest]} = s) do
    {_, entries} = Map.fetch!(s.pending, opts)
    # Under a backlog, up to `:backlog_batches` batches' worth of callers go to the engine in one
    # call: it orders their texts by length before cutting forward passes of `:batch_size`, so
    # less padding is computed than with arrival-order batches.
    {batch, left} = take(Enum.reverse(entries), s.batch_size * s.backlog_batches, 0, [])
    left_n = count(left)

    s = %{s | ready: rest, timers: Map.delete(s.timers, opts)}

    s =
      case left do
        [] ->
          %{s | pending: Map.delete(s.pending, opts)}

        _ ->
          s = %{s | pending: Map.put(s.pending, opts, {left_n, Enum.reverse(left)})}
          if left_n >= s.batch_size, do: mark_ready(s, opts), else: start_timer(s, opts)
      end

    model = s.model
    texts = Enum.flat_map(batch, fn {_, t, _} -> t end)
    call_opts = Keyword.merge(s.defaults, opts) |> Keyword.put(:batch_size, s.batch_size)

    {_pid, mref} =
      spawn_monitor(fn ->
        exit({:sembed_batch, Sembed.embed(model, texts, call_opts)})
      end)

    %{s | running: {mref, batch}}
  end

  defp run_next(s), do: s

  # Texts of queued callers.
  defp count(entries), do: entries |> Enum.map(fn {_, t, _} -> length(t) end) |> Enum.sum()

  defp backlog_batches!(n) when is_integer(n) and n > 0, do: n

  defp backlog_batches!(n),
    do:
      raise(ArgumentError, "Sembed.Serving: :backlog_batches must be a positive integer, got: #{inspect(n)}")

  defp take([], _max, _n, acc), do: {Enum.reverse(acc), []}

  defp take([{_, t, _} = e | rest], max, n, acc) do
    if acc != [] and n + length(t) > max,
      do: {Enum.reverse(acc), [e | rest]},
      else: take(rest, max, n + length(t), [e | acc])
  end

  defp reply_all(entries, {:ok, vectors}) do
    Enum.reduce(entries, vectors, fn {from, texts, single?}, vs ->
      {mine, rest} = Enum.split(vs, length(texts))
      GenServer.reply(from, {:ok, if(single?, do: hd(mine), else: mine)})
      rest
    end)

    :ok
  end

  defp reply_all(entries, {:error, _} = e) do
    Enum.each(entries, fn {from, _, _} -> GenServer.reply(from, e) end)
  end
end
