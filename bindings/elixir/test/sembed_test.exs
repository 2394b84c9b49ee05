defmodule SembedTest do
  use ExUnit.Case, async: false
  import Sembed.TestHelper

  @texts [
    "fn main() { println!(\"hello\"); }",
    "def add(a, b), do: a + b",
    "SELECT name FROM users WHERE id = $1",
    "Ünïcödé text: 日本語のテキスト ✓",
    "a",
    String.duplicate("long text that will be cut at the model's limit ", 60)
  ]

  describe "the NIF's vectors equal `sembed embed`'s" do
    for name <- ["bert-tiny", "qwen2-bidir-tiny", "qwen3-causal-tiny", "jina-v3-tiny"] do
      @name name
      test "golden model #{name}, as documents and as queries" do
        path = fixture(@name)
        {:ok, model} = Sembed.load(path)

        for input_type <- [:document, :query] do
          {:ok, vs} = Sembed.embed(model, @texts, input_type: input_type)
          ref = cli_embed(["-m", path], @texts, ["--input-type", Atom.to_string(input_type)])
          assert length(vs) == length(ref)

          for {v, r} <- Enum.zip(vs, ref) do
            assert byte_size(v) == model.dimension * 4
            assert max_abs_diff(v, r) <= 1.0e-6
          end
        end
      end
    end

    test "the real all-MiniLM-L6-v2 (the default model), f32 and int8" do
      {:ok, model} = Sembed.load()
      assert model.dimension == 384
      assert model.name =~ "all-MiniLM-L6-v2"
      {:ok, vs} = Sembed.embed(model, @texts)
      ref = cli_embed([], @texts)
      for {v, r} <- Enum.zip(vs, ref), do: assert(max_abs_diff(v, r) <= 1.0e-6)

      norm = vs |> hd() |> Sembed.to_list() |> Enum.map(&(&1 * &1)) |> Enum.sum()
      assert_in_delta norm, 1.0, 1.0e-5

      {:ok, q} = Sembed.load(:default, precision: :int8)
      assert q.precision == "int8"
      assert q.engine =~ "int8"
      {:ok, qv} = Sembed.embed(q, @texts)
      qref = cli_embed(["--quantize", "int8"], @texts)
      for {v, r} <- Enum.zip(qv, qref), do: assert(max_abs_diff(v, r) <= 1.0e-6)
    end

    test "a fusion (Qodo ⊕ Jina shapes) from keyword parts and from a .toml, with options" do
      q = fixture("qwen2-bidir-tiny")
      j = fixture("jina-v3-tiny")
      {:ok, fused} = Sembed.load(qodo: q, jina: j)
      assert fused.models == 2
      dir = tmp_dir("fusion")
      toml = Path.join(dir, "fusion.toml")
      File.write!(toml, ~s([[model]]\nname = "qodo"\nref = "#{q}"\n[[model]]\nname = "jina"\nref = "#{j}"\n))
      {:ok, from_toml} = Sembed.load(toml)
      {:ok, a} = Sembed.embed(fused, @texts, input_type: :document)
      {:ok, b} = Sembed.embed(from_toml, @texts, input_type: :document)
      assert a == b
      ref = cli_embed(["-m", toml], @texts, ["--input-type", "document"])
      for {v, r} <- Enum.zip(a, ref), do: assert(max_abs_diff(v, r) <= 1.0e-6)

      # Raw pooled vectors and a Jina task, against the CLI's.
      {:ok, jm} = Sembed.load(j)
      {:ok, raw} = Sembed.embed(jm, @texts, task: "text-matching", normalize: false)
      ref = cli_embed(["-m", j], @texts, ["--task", "text-matching", "--no-normalize"])
      for {v, r} <- Enum.zip(raw, ref), do: assert(max_abs_diff(v, r) <= 1.0e-6)
    end
  end

  test "a single text gives one vector, a list gives a list in order" do
    {:ok, model} = Sembed.load(fixture("bert-tiny"))
    {:ok, one} = Sembed.embed(model, "a")
    {:ok, [a, b]} = Sembed.embed(model, ["a", "b"])
    assert one == a
    refute a == b
    assert length(Sembed.to_list(one)) == model.dimension
  end

  describe "bad input is an error that names it, never a crash" do
    setup do
      {:ok, model} = Sembed.load(fixture("bert-tiny"))
      %{model: model}
    end

    test "not a binary, an empty list, an unknown or mistyped option raise ArgumentError", %{model: m} do
      assert_raise ArgumentError, ~r/expected a text/, fn -> Sembed.embed(m, 42) end

      assert_raise ArgumentError, ~r/every text must be a binary.*:atom/, fn ->
        Sembed.embed(m, ["ok", :atom])
      end

      assert_raise ArgumentError, ~r/list of texts is empty/, fn -> Sembed.embed(m, []) end
      assert_raise ArgumentError, ~r/unknown keys \[:colour\]/, fn -> Sembed.embed(m, "x", colour: :red) end

      assert_raise ArgumentError, ~r/:input_type must be/, fn ->
        Sembed.embed(m, "x", input_type: :passage)
      end

      assert_raise ArgumentError, ~r/:dimensions must be a positive integer/, fn ->
        Sembed.embed(m, "x", dimensions: -3)
      end

      assert_raise ArgumentError, ~r/:precision must be one of/, fn ->
        Sembed.load(fixture("bert-tiny"), precision: :f64)
      end

      assert_raise ArgumentError, ~r/expected a %Sembed.Model/, fn -> Sembed.embed("not a model", "x") end
    end

    test "text that is not UTF-8", %{model: m} do
      assert {:error, %Sembed.Error{reason: :embed, message: msg}} = Sembed.embed(m, ["fine", <<0xC3, 0x28>>])
      assert msg =~ "text 1 is not valid UTF-8"
    end

    test "a text over the limit with truncate: false, and an unknown task", %{model: m} do
      long = String.duplicate("word ", 2000)
      assert {:error, %Sembed.Error{reason: :embed, message: msg}} = Sembed.embed(m, long, truncate: false)
      assert msg =~ "tokens"
      {:ok, j} = Sembed.load(fixture("jina-v3-tiny"))
      assert {:error, %Sembed.Error{message: msg}} = Sembed.embed(j, "x", task: "bogus")
      assert msg =~ "unknown task `bogus`"
    end

    test "a missing model folder" do
      assert {:error, %Sembed.Error{reason: :load, message: msg}} = Sembed.load("/no/such/model")
      assert msg =~ "no such model folder /no/such/model"
      assert_raise Sembed.Error, ~r/no such model folder/, fn -> Sembed.load!("/no/such/model") end
    end

    test "a corrupt safetensors file names the file" do
      dir = tmp_dir("corrupt")
      src = fixture("bert-tiny")
      File.cp_r!(src, dir)
      st = Path.join(dir, "model.safetensors")
      bytes = File.read!(st)
      File.write!(st, binary_part(bytes, 0, div(byte_size(bytes), 3)))
      assert {:error, %Sembed.Error{reason: :load, message: msg}} = Sembed.load(dir)
      assert msg =~ "model.safetensors"

      File.write!(st, "not a safetensors file at all")
      assert {:error, %Sembed.Error{reason: :load, message: msg}} = Sembed.load(dir)
      assert msg =~ "model.safetensors"
    end

    test "max_length out of the model's range" do
      assert {:error, %Sembed.Error{reason: :load, message: msg}} =
               Sembed.load(fixture("bert-tiny"), max_length: 1_000_000)

      assert msg =~ "max_length 1000000 out of range"
    end

    test "a panic inside the NIF becomes an error and the VM goes on", %{model: m} do
      assert {:error, %Sembed.Error{reason: :panic, message: msg}} = Sembed.__panic_for_test__()
      assert msg =~ "a panic on purpose"
      # The same model still answers, and so does the VM.
      assert {:ok, _} = Sembed.embed(m, "still alive")
    end
  end

  test "forward passes run on dirty CPU schedulers: normal schedulers stay responsive" do
    {:ok, model} = Sembed.load()
    texts = for i <- 1..256, do: "text number #{i} " <> String.duplicate("padding words ", 20)
    parent = self()

    # A ticker on a normal scheduler measures the longest gap between its wake-ups while
    # embeddings run; a NIF holding a normal scheduler would stretch it to the whole pass.
    ticker =
      spawn(fn ->
        loop = fn loop, last, worst ->
          receive do
            :stop -> send(parent, {:worst_gap_ms, worst})
          after
            1 ->
              now = System.monotonic_time(:millisecond)
              loop.(loop, now, max(worst, now - last))
          end
        end

        loop.(loop, System.monotonic_time(:millisecond), 0)
      end)

    t0 = System.monotonic_time(:millisecond)
    tasks = for _ <- 1..System.schedulers_online(), do: Task.async(fn -> Sembed.embed(model, texts) end)
    for t <- tasks, do: assert({:ok, _} = Task.await(t, 120_000))
    elapsed = System.monotonic_time(:millisecond) - t0
    send(ticker, :stop)
    assert_receive {:worst_gap_ms, worst}, 5_000
    # The passes took seconds; the ticker never waited more than a small part of that.
    assert elapsed > 500
    assert worst < 200, "a normal scheduler was blocked #{worst} ms of #{elapsed} ms"
  end

  test "loading and dropping models repeatedly does not grow memory" do
    load_and_drop = fn ->
      {pid, ref} =
        spawn_monitor(fn ->
          {:ok, m} = Sembed.load()
          {:ok, _} = Sembed.embed(m, ["one text", "and another one"])
          {:ok, q} = Sembed.load(:default, precision: :int8)
          {:ok, _} = Sembed.embed(q, "x")
        end)

      receive do
        {:DOWN, ^ref, :process, ^pid, :normal} -> :ok
        {:DOWN, ^ref, :process, ^pid, other} -> flunk("loader died: #{inspect(other)}")
      end

      :erlang.garbage_collect()
    end

    # Warm up (allocator pools, the tokenizer's caches), then 15 more rounds: each loads the
    # 90 MB model twice, so a leak of the weights would show as >1 GB.
    for _ <- 1..3, do: load_and_drop.()
    before = rss_kib()
    for _ <- 1..15, do: load_and_drop.()
    growth_mib = (rss_kib() - before) / 1024
    assert growth_mib < 100, "RSS grew #{Float.round(growth_mib, 1)} MiB over 15 load/drop rounds"
  end
end
