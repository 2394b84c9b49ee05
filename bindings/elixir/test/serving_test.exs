defmodule Sembed.ServingTest do
  use ExUnit.Case, async: false
  import Sembed.TestHelper

  test "a hundred concurrent callers each get their own vector, in shared batches" do
    {:ok, model} = Sembed.load()
    texts = for i <- 1..100, do: "caller #{i}: def f#{i}(x), do: x * #{i}"
    {:ok, expected} = Sembed.embed(model, texts)

    start_supervised!({Sembed.Serving, name: :serving_test, model: model, batch_size: 16, batch_timeout: 50})

    results =
      texts
      |> Enum.map(fn t -> Task.async(fn -> Sembed.Serving.embed(:serving_test, t) end) end)
      |> Enum.map(&Task.await(&1, 120_000))

    for {{:ok, v}, e} <- Enum.zip(results, expected) do
      # Batched with other texts, padded differently: equal to the solo pass within f32 noise.
      assert max_abs_diff(v, e) < 1.0e-5
    end

    assert length(results) == 100
    %{batches: b, texts: n} = Sembed.Serving.stats(:serving_test)
    assert n == 100
    # Shared: at most one pass per full batch plus the stragglers, never one per caller.
    assert b <= 12, "#{b} batches for 100 callers with batch_size 16"
  end

  test "lists, options batched apart, and the serving loading its own model" do
    start_supervised!(
      {Sembed.Serving,
       name: :serving_opts, model: fixture("qwen3-causal-tiny"), batch_size: 8, batch_timeout: 20}
    )

    {:ok, m} = Sembed.load(fixture("qwen3-causal-tiny"))
    assert Sembed.Serving.model(:serving_opts).dimension == m.dimension

    calls =
      for i <- 1..12 do
        type = if rem(i, 2) == 0, do: :query, else: :document
        texts = for j <- 1..(rem(i, 3) + 1), do: "text #{i}.#{j}"
        {type, texts, Task.async(fn -> Sembed.Serving.embed(:serving_opts, texts, input_type: type) end)}
      end

    for {type, texts, task} <- calls do
      {:ok, got} = Task.await(task, 60_000)
      {:ok, want} = Sembed.embed(m, texts, input_type: type)
      assert length(got) == length(want)
      for {g, w} <- Enum.zip(got, want), do: assert(max_abs_diff(g, w) < 1.0e-5)
    end
  end

  test "a failing call answers its caller with the error; the serving goes on" do
    start_supervised!({Sembed.Serving, name: :serving_err, model: fixture("bert-tiny"), batch_timeout: 5})
    assert {:error, %Sembed.Error{message: msg}} = Sembed.Serving.embed(:serving_err, <<0xFF>>)
    assert msg =~ "not valid UTF-8"
    assert {:ok, v} = Sembed.Serving.embed(:serving_err, "fine")
    assert byte_size(v) == 32 * 4
    assert_raise ArgumentError, ~r/unknown keys/, fn -> Sembed.Serving.embed(:serving_err, "x", bogus: 1) end
    assert_raise ArgumentError, ~r/list of texts is empty/, fn -> Sembed.Serving.embed(:serving_err, []) end
  end

  test "a serving whose model cannot load does not start, and says why" do
    Process.flag(:trap_exit, true)
    assert {:error, %Sembed.Error{reason: :load}} = Sembed.Serving.start_link(model: "/no/such/model")

    assert {:error, %Sembed.Error{reason: :down}} = Sembed.Serving.embed(:not_started, "x")
  end

  test "a child spec for the application's supervision tree" do
    spec = Sembed.Serving.child_spec(name: MyApp.Embedder, model: fixture("bert-tiny"))
    assert spec.id == Sembed.Serving
    assert {Sembed.Serving, :start_link, [_]} = spec.start
  end
end
