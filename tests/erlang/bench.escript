#!/usr/bin/env escript
%% The client side of `cargo bench --bench erlang`: round trips of
%% {api, status, ""} to evrhost beside an Erlang-to-Erlang echo of the same
%% shape, measured in this one node, in alternating rounds.
%% Usage: bench.escript SELF EVRHOST ECHONODE COOKIE N ROUNDS
%% Prints "seq TARGET ROUND p50_ns p99_ns" and "conc TARGET ROUND per_second".
-mode(compile).

main([Self, Evr, Echo, Cookie, NStr, RoundsStr]) ->
    {ok, _} = net_kernel:start([list_to_atom(Self), shortnames]),
    erlang:set_cookie(node(), list_to_atom(Cookie)),
    N = list_to_integer(NStr),
    Targets = [{evrhost, {foo, list_to_atom(Evr)}}, {echo, {echo, list_to_atom(Echo)}}],
    up(list_to_atom(Echo), 100),
    %% Warm up both connections.
    [roundtrips(T, 1000) || {_, T} <- Targets],
    [begin
         [seq(Name, T, N, R) || {Name, T} <- Targets],
         [conc(Name, T, N, R) || {Name, T} <- Targets]
     end || R <- lists:seq(1, list_to_integer(RoundsStr))],
    halt(0).

%% evrhost takes the sender from the distribution header, as
%% mod_erlang_event does; the echo process needs it in the message.
call({echo, _} = T) -> T ! {self(), {api, status, ""}}, answer();
call(T) -> T ! {api, status, ""}, answer().

%% The echo node starts beside this one: wait until it answers and has
%% registered its process.
up(_, 0) -> error(echo_node_down);
up(Node, K) ->
    case net_adm:ping(Node) =:= pong andalso rpc:call(Node, erlang, whereis, [echo]) of
        Pid when is_pid(Pid) -> ok;
        _ -> timer:sleep(100), up(Node, K - 1)
    end.

answer() ->
    receive {ok, _} -> ok; Other -> error({unexpected, Other}) after 5000 -> error(timeout) end.

roundtrips(_, 0) -> ok;
roundtrips(T, K) -> call(T), roundtrips(T, K - 1).

seq(Name, T, N, Round) ->
    Times = [begin
                 A = erlang:monotonic_time(nanosecond),
                 call(T),
                 erlang:monotonic_time(nanosecond) - A
             end || _ <- lists:seq(1, N)],
    S = lists:sort(Times),
    io:format("seq ~s ~p ~p ~p~n", [Name, Round, lists:nth(N div 2, S), lists:nth(N * 99 div 100, S)]).

conc(Name, T, N, Round) ->
    Parent = self(),
    A = erlang:monotonic_time(nanosecond),
    Pids = [spawn_link(fun() -> roundtrips(T, N div 4), Parent ! {done, self()} end) || _ <- lists:seq(1, 4)],
    [receive {done, P} -> ok end || P <- Pids],
    Ns = erlang:monotonic_time(nanosecond) - A,
    io:format("conc ~s ~p ~p~n", [Name, Round, (N div 4) * 4 * 1000000000 div Ns]).
