#!/usr/bin/env escript
%% The Erlang side of evrhost's outbound mode and XML bindings, as the
%% seed's myhandler example: a registered `myhandler` process answers
%% `{call, Event}` with `{route_reply, UUID, Reply}`, hands out new pids for
%% `{get_pid, UUID, Ref, Pid}`, and `evrtest:launch/1` does the same by rpc.
%% After its first call it binds the `directory` section and answers fetches.
%% Usage: handler.escript SELF EVRHOST COOKIE shortnames|longnames
-mode(compile).

main([Self, Evr, Cookie, Names]) ->
    {ok, _} = net_kernel:start([list_to_atom(Self), list_to_atom(Names)]),
    erlang:set_cookie(node(), list_to_atom(Cookie)),
    load_launcher(),
    register(myhandler, spawn(fun() -> run(list_to_atom(Evr), first) end)),
    io:format("ready~n"),
    receive stop -> ok end.

%% evrtest:launch/1, for `evrtest:launch node@host` routes (rex calls it).
load_launcher() ->
    Forms = [{attribute, 1, module, evrtest},
             {attribute, 2, export, [{launch, 1}]},
             {function, 3, launch, 1,
              [{clause, 3, [{var, 3, 'Ref'}], [],
                [{tuple, 3, [{var, 3, 'Ref'},
                             {call, 3, {atom, 3, spawn},
                              [{'fun', 3, {clauses, [{clause, 3, [], [],
                                 [{call, 3, {remote, 3, {atom, 3, erlang}, {atom, 3, apply}},
                                   [{call, 3, {remote, 3, {atom, 3, persistent_term}, {atom, 3, get}}, [{atom, 3, evrtest_run}]},
                                    {nil, 3}]}]}]}}]}]}]}]}],
    {ok, evrtest, Bin} = compile:forms(Forms),
    {module, evrtest} = code:load_binary(evrtest, "evrtest.erl", Bin),
    persistent_term:put(evrtest_run, fun() -> run(undefined, spawned) end).

run(Evr, State) ->
    receive
        {call_event, {event, [UUID | Headers]}} ->
            Node = list_to_atom(proplists:get_value("Reply-Node", Headers)),
            Reply = {ok, "again " ++ proplists:get_value("body", Headers),
                     [{"X-Handler", "call_event"}, {"X-Pid", pid_to_list(self())}]},
            {myhandler, Node} ! {route_reply, UUID, Reply},
            run(Evr, State);
        {call, {event, [UUID | Headers]}} ->
            Body = proplists:get_value("body", Headers),
            Route = proplists:get_value("Route", Headers),
            Node = list_to_atom(proplists:get_value("Reply-Node", Headers)),
            Reply = case Body of
                        "decline" -> declined;
                        "fail" -> {error, "told to fail"};
                        "silent" -> silent;
                        _ -> {ok, "hello " ++ Body ++ " from " ++ Route,
                              [{"X-Handler", atom_to_list(State)}, {"X-Pid", pid_to_list(self())}]}
                    end,
            Reply =/= silent andalso ({myhandler, Node} ! {route_reply, UUID, Reply}),
            case State of
                first -> bind(Evr), run(Evr, registered);
                _ -> run(Evr, State)
            end;
        {get_pid, _UUID, Ref, Pid} ->
            Pid ! {Ref, spawn(fun() -> run(Evr, spawned) end)},
            run(Evr, State)
    end.

bind(Evr) ->
    Parent = self(),
    spawn(fun() ->
        {foo, Evr} ! {bind, directory},
        receive ok -> io:format("bound~n") after 3000 -> io:format("bind failed~n") end,
        Parent ! bound,
        fetches(Evr)
    end).

fetches(Evr) ->
    receive
        {fetch, directory, "domain", "name", Domain, Id, Params} ->
            User = proplists:get_value("user", Params),
            Xml = "<document type=\"freeswitch/xml\"><section name=\"directory\"><domain name=\"" ++ Domain ++
                  "\"><user id=\"" ++ User ++ "\"/></domain></section></document>",
            {foo, Evr} ! {fetch_reply, Id, Xml},
            receive {ok, Id} -> ok after 3000 -> io:format("no fetch_reply ack~n") end,
            %% A second answer to the same fetch is a duplicate.
            {foo, Evr} ! {fetch_reply, Id, Xml},
            receive {error, Id, duplicate_response} -> io:format("duplicate refused~n")
            after 3000 -> io:format("no duplicate answer~n") end,
            fetches(Evr);
        Other ->
            io:format("unexpected ~p~n", [Other]),
            fetches(Evr)
    end.
